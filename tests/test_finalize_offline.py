"""MLflow down when training ends (vae/training/finalize.py, vae/tracking/journal.py): the trained model and its
evaluation stay in
output_dir, the run exits 1 after a short retry budget printing one command, and that command, once MLflow is back,
registers the model and finishes the run."""

from __future__ import annotations

import json
import shlex
import sys
import uuid
from pathlib import Path

import mlflow
import pytest
from conftest import REPO, run
from support.journal import entries, journal_of, logged_image_steps, train_argv
from support.servers import MlflowServer

from vae.tracking.store import ensure_experiment
from vae.training import checkpoint
from vae.training.trainer import GRID_KEY

pytestmark = [pytest.mark.server, pytest.mark.slow]


def test_mlflow_down_when_training_ends_keeps_the_model_and_the_printed_command_registers_it(
        tmp_path, digits_shards, monkeypatch):
    srv = MlflowServer(tmp_path / "mlflow-server")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", srv.uri)
    mlflow.set_tracking_uri(srv.uri)
    srv.start()
    try:
        client = mlflow.MlflowClient(srv.uri)
        run_id = client.create_run(ensure_experiment("offline-finalize", srv.uri)).info.run_id
    finally:
        srv.stop()  # down from the start of training to its end: the URI is a closed loopback port now
    name = f"vae-test-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    argv = train_argv(tmp_path, digits_shards, "--train.epochs", "1", "--tracking.finalize", "register",
                      "--tracking.tracking_uri", srv.uri, "--tracking.model_name", name, "--loss.eval_iwae_k", "2")
    result = run(argv, cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]  # training is done, registration is not: say so
    path = journal_of(tmp_path)
    command = f"python -m vae.tracking {path} {run_id} --uri {srv.uri}"
    assert f"register them and finish the run with: {command}" in result.stderr
    assert "Traceback" not in result.stderr
    out = tmp_path / "run"
    assert checkpoint.latest(out) is not None  # the trained model is kept ...
    metrics = json.loads((out / "metrics.json").read_text())  # ... and its evaluation and plots
    assert {"val/nll_iwae", "val/bpd", "val/elbo"} <= set(metrics)
    assert (out / "evaluation.json").is_file() and (out / "plots" / "samples.png").is_file()
    journaled = entries(path)
    assert [e["kind"] for e in journaled[-2:]] == ["publish", "status"] and journaled[-1]["status"] == "FINISHED"
    [grid] = [e for e in journaled if e["kind"] == "image"]  # the one validation's grid, kept for later
    validated_at = {e["step"] for e in journaled if e["kind"] == "metrics" and "val/elbo" in e["metrics"]}
    assert grid["key"] == GRID_KEY and {grid["step"]} == validated_at and Path(grid["path"]).is_file()

    srv.start()
    try:
        synced = run([sys.executable, *shlex.split(command)[1:]], cwd=REPO)
        assert synced.returncode == 0, synced.stderr[-3000:]
        client = mlflow.MlflowClient(srv.uri)
        champion = client.get_model_version_by_alias(name, "champion")
        assert champion.run_id == run_id and float(champion.tags["val_nll"]) == metrics["val/nll_iwae"]
        finished = client.get_run(run_id)
        assert finished.info.status == "FINISHED"
        assert finished.data.metrics["val/nll_iwae"] == metrics["val/nll_iwae"]
        assert {a.path for a in client.list_artifacts(run_id, "plots")} >= {"plots/samples.png"}
        assert logged_image_steps(client, run_id, GRID_KEY) == [grid["step"]]  # the grid went with the sync
        again = run([sys.executable, *shlex.split(command)[1:]], cwd=REPO)  # nothing left: no second version
        assert again.returncode == 0 and len(client.search_model_versions(f"name='{name}'")) == 1
        assert logged_image_steps(client, run_id, GRID_KEY) == [grid["step"]]
    finally:
        srv.stop()
