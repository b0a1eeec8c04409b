"""A registered model to read back, and `vaepipe models` as a subprocess: the tests of that command."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import torch

from vae.models.spec import build_from_spec, model_spec
from vae.registry.packaging import log_model
from vae.registry.versions import register_version
from vae.tracking.store import ensure_experiment

REPO = Path(__file__).resolve().parents[2]
SPEC = model_spec("mlp", (1, 8, 8), 2, hidden_dim=8)


def register_two_versions(uri: str) -> tuple[str, dict[int, torch.nn.Module]]:
    """On the server at `uri` (this process's tracking URI): a new model with two versions of different weights,
    1 (NLL 100, champion) and 2 (NLL 120, challenger); (its name, the module of each version)."""
    import mlflow

    run = mlflow.MlflowClient().create_run(ensure_experiment("registry-cli", uri))
    name = f"vae-test-{uuid.uuid4().hex[:8]}"
    modules = {}
    for version, (seed, nll) in enumerate([(0, 100.0), (1, 120.0)], start=1):
        torch.manual_seed(seed)
        modules[version] = build_from_spec(SPEC).eval()
        model_uri = log_model(modules[version], SPEC, run.info.run_id)
        tags = {"val_elbo": repr(-nll - 5), "val_bpd": "1.25", "git_commit": "0123456789abcdef"}
        if register_version(model_uri, name, nll, run.info.run_id, tags=tags).version != version:
            raise RuntimeError(f"{name} got another version than {version}: is another test registering it?")
    return name, modules


def register_new(model: torch.nn.Module, spec: dict, uri: str, experiment: str, score: float = 1.0) -> str:
    """`model` (built from `spec`) logged in a new run of `experiment` at `uri` (this process's tracking URI) and
    registered as version 1 of a fresh name, with `score`; the name."""
    import mlflow

    run_id = mlflow.MlflowClient(uri).create_run(ensure_experiment(experiment, uri)).info.run_id
    name = f"vae-{experiment}-{uuid.uuid4().hex[:8]}"
    register_version(log_model(model, spec, run_id), name, score, run_id)
    return name


def vaepipe_models(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`vaepipe models ARGS` with this process's environment (MLFLOW_TRACKING_URI included), run in `cwd`."""
    return subprocess.run([str(Path(sys.executable).parent / "vaepipe"), "models", *args], env=dict(os.environ),
                          cwd=cwd or REPO, capture_output=True, text=True, timeout=300)
