"""Models registered before the package move (issue 23) still load: tests/data/legacy_models holds two MLflow models
saved by the code of a8888c8 (its script, make.py, says how), with the outputs that code computed. Each is
registered in a fresh store and loaded by today's code, as `mlflow.pyfunc.load_model` and as a torch module, in a
fresh interpreter (loading a model puts its carried copy of `vae.models` on the path)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import REPO

LEGACY = REPO / "tests/data/legacy_models"
# Each load in its own fresh interpreter, as a user's would be: MLflow puts a loaded model's carried code (`vae` with
# the old `vae.models`) first on sys.path, so in a process that had not imported vaepipe before, later vaepipe
# imports would find that old copy (a hazard of MLflow's code_paths, noted in ARCHITECTURE.md).
PYFUNC = """
import sys, numpy as np, mlflow
uri, store, out = sys.argv[1:4]
mlflow.set_tracking_uri(store)
x = np.load(out + "/expected.npz")["x"]
np.save(out + "/pyfunc.npy", mlflow.pyfunc.load_model(uri).predict(x, params={"mode": "reconstruct"}))
"""
TORCH = """
import sys, numpy as np, mlflow, torch
from vae.registry.packaging import load_torch_model
uri, store, out = sys.argv[1:4]
mlflow.set_tracking_uri(store)
model = load_torch_model(uri)
with torch.inference_mode():
    x = torch.from_numpy(np.load(out + "/expected.npz")["x"])
    np.save(out + "/module.npy", model.decode(model.encode(x)[0]).numpy())
"""


@pytest.mark.parametrize("name", ["conv-digits", "aekl-tiny"])
def test_a_model_registered_before_the_move_loads_and_reconstructs_as_it_did(name, tracking_uri, tmp_path):
    made_by = json.loads((LEGACY / name / "made_by.json").read_text())
    assert made_by["commit"].startswith("a8888c8")  # saved by the code of before the move, not by today's
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.create_experiment(f"legacy-{name}-{tmp_path.name}",
                                          artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(LEGACY / name), artifact_path="model")
    mlflow.set_tracking_uri(tracking_uri)
    try:
        version = mlflow.register_model(f"runs:/{run.info.run_id}/model", f"legacy-{name}-{tmp_path.name}")
    finally:
        mlflow.set_tracking_uri(None)
    out = tmp_path / "out"
    out.mkdir()
    np.savez(out / "expected.npz", **np.load(LEGACY / name / "expected.npz"))
    for script in (PYFUNC, TORCH):
        subprocess.run([sys.executable, "-c", script, f"models:/{version.name}/{version.version}", tracking_uri,
                        str(out)], check=True, cwd=REPO, timeout=600)
    expected = np.load(LEGACY / name / "expected.npz")["reconstruct"]
    np.testing.assert_allclose(np.load(out / "pyfunc.npy"), expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.load(out / "module.npy"), expected, rtol=0, atol=1e-5)
    assert Path(LEGACY / name / "mlflow_model.py").is_file()  # it carries the old model file, not today's pyfunc.py
