"""Packaging a trained VAE as an MLflow model, registering it, and loading it back as a torch module.

The MLflow model is `vae/mlflow_model.py` logged as code, with the config as JSON and the weights as
safetensors: nothing is pickled. The alias `champion` names the registered version with the best
validation ELBO (higher is better; a negative number in nats), read from each version's `val_elbo` tag.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import Model, infer_signature
from safetensors.torch import load_file, save_file
from torch import nn

from vae.models import build_model

PACKAGE_DIR = Path(__file__).resolve().parent
MODEL_CODE = PACKAGE_DIR / "mlflow_model.py"
CHAMPION = "champion"
ELBO_TAG = "val_elbo"
REQUIREMENTS = ("torch", "safetensors", "numpy", "mlflow")


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: int
    uri: str  # models:/<name>/<version>
    champion: bool  # whether this version now holds the alias
    previous_champion_elbo: float | None  # the champion's val_elbo before this registration; None: there was none


def model_spec(arch: str, image_shape: tuple[int, int, int], latent_dim: int, **options: Any) -> dict:
    """Everything `build_model` needs, as plain JSON data (tuples become lists, as they will after a load)."""
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (C, H, W), got {tuple(image_shape)}")
    spec = {"arch": arch, "image_shape": [int(n) for n in image_shape], "latent_dim": int(latent_dim),
            "options": options}
    return json.loads(json.dumps(spec))  # fails here, not at load time, on options JSON cannot hold


def build_from_spec(spec: dict) -> nn.Module:
    """An untrained module for `spec`."""
    return build_model(spec["arch"], tuple(spec["image_shape"]), spec["latent_dim"], **spec.get("options", {}))


def _model_code(dst: Path) -> Path:
    """A copy of the `vae` package holding only what the model file imports (the package init and models)."""
    package = dst / "vae"
    shutil.copytree(PACKAGE_DIR / "models", package / "models", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(PACKAGE_DIR / "__init__.py", package / "__init__.py")
    return package


def _requirements() -> list[str]:
    # Pinned to what produced the model, without the local tag: a "+cpu" torch pin would refuse CUDA builds.
    return [f"{name}=={installed_version(name).split('+')[0]}" for name in REQUIREMENTS]


def log_model(model: nn.Module, spec: dict, run_id: str, input_example: np.ndarray | None = None) -> str:
    """Log `model` into run `run_id` as the pyfunc model "model"; return its URI (models:/m-...).

    `input_example` is a float32 batch (N, C, H, W) in [0, 1]; by default two uniform-noise images.
    """
    active = mlflow.active_run()
    if active is not None and active.info.run_id != run_id:
        raise ValueError(f"run {active.info.run_id} is active; cannot log the model into run {run_id}")
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    # Rebuilding from the spec checks, before anything is logged, that spec and weights agree.
    packaged = build_from_spec(spec)
    packaged.load_state_dict(weights)
    packaged.eval()
    if input_example is None:
        input_example = np.random.default_rng(0).random((2, *spec["image_shape"]), dtype=np.float32)
    input_example = np.array(input_example, dtype=np.float32)  # a writable copy for torch.from_numpy
    with torch.inference_mode():
        mu, _ = packaged.encode(torch.from_numpy(input_example))
        output = packaged.decode(mu).numpy()
    signature = infer_signature(input_example, output, params={"mode": "reconstruct"})

    with tempfile.TemporaryDirectory() as tmp:
        save_file(weights, Path(tmp, "weights.safetensors"))
        Path(tmp, "config.json").write_text(json.dumps(spec, indent=2))
        # MLflow only attaches to a run it finds active; a run we start here ends when logging does.
        run = contextlib.nullcontext() if active is not None else mlflow.start_run(run_id=run_id)
        with run:
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(MODEL_CODE),
                artifacts={"config": str(Path(tmp, "config.json")), "weights": str(Path(tmp, "weights.safetensors"))},
                code_paths=[str(_model_code(Path(tmp, "code")))],
                signature=signature,
                input_example=input_example,
                pip_requirements=_requirements(),
            )
    return info.model_uri


def _champion_elbo(client: mlflow.MlflowClient, name: str) -> float | None:
    """The champion's val_elbo; None when the model does not exist yet or no version holds the alias."""
    try:
        aliases = client.get_registered_model(name).aliases  # {alias: version}
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    # Looked up in the alias list first: a missing alias is INVALID_PARAMETER_VALUE over REST, as is a bad name.
    if CHAMPION not in aliases:
        return None
    champion = client.get_model_version_by_alias(name, CHAMPION)
    if ELBO_TAG not in champion.tags:
        raise ValueError(
            f"{name} version {champion.version} holds the alias {CHAMPION!r} but has no {ELBO_TAG!r} tag to "
            f"compare against; tag it or move the alias by hand"
        )
    return float(champion.tags[ELBO_TAG])


def register(model_uri: str, name: str, val_elbo: float, run_id: str) -> RegisteredVersion:
    """Register `model_uri` as a new version of `name`; it takes the alias `champion` only if its
    validation ELBO is strictly higher than the champion's (or there is no champion)."""
    val_elbo = float(val_elbo)
    if not math.isfinite(val_elbo):
        raise ValueError(f"val_elbo must be a finite number, got {val_elbo}")
    client = mlflow.MlflowClient()
    previous = _champion_elbo(client, name)  # read first: a broken champion tag fails before registering
    # repr() round-trips a float exactly, so the comparison next time sees the same number.
    registered = mlflow.register_model(model_uri, name, tags={ELBO_TAG: repr(val_elbo)})
    version = int(registered.version)
    champion = previous is None or val_elbo > previous
    if champion:
        client.set_registered_model_alias(name, CHAMPION, str(version))
    client.set_tag(run_id, "registered_model_version", f"{name}/{version}")  # the run page names its version
    return RegisteredVersion(name, version, f"models:/{name}/{version}", champion, previous)


def load_torch_model(model_uri: str) -> nn.Module:
    """The torch module behind a logged or registered model (e.g. models:/vae-digits@champion), CPU, eval."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        # Artifact paths as the pyfunc flavor recorded them, relative to the model directory.
        artifacts = Model.load(str(local)).flavors["python_function"]["artifacts"]
        spec = json.loads((local / artifacts["config"]["path"]).read_text())
        weights = load_file(local / artifacts["weights"]["path"], device="cpu")
    model = build_from_spec(spec)
    model.load_state_dict(weights)
    return model.eval()
