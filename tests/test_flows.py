"""The Prefect flows and the `vaepipe` command: ingestion, bad input, cancellation, and a served deployment.

Prefect reads its settings once, at import, so PREFECT_HOME is redirected with `temporary_settings` for this
process and through the environment for child processes: the tests never touch ~/.prefect.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import psutil
import pytest
from conftest import BIN, free_port, isolated_prefect, run, stop, wait_http

import pipeline
from flows.ingest import ingest_dataset
from vae.config import IngestSection, SourceSection


@pytest.fixture(scope="module", autouse=True)
def prefect_home(tmp_path_factory):
    """An isolated Prefect home for this process and its children, and no API URL inherited from the shell."""
    with isolated_prefect(tmp_path_factory.mktemp("prefect-home")) as home:
        yield home


@pytest.fixture(scope="module")
def prefect_api(prefect_home):
    """Prefect's own test server, for flows run in this process; it drains log and event workers on exit."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield


def test_ingest_flow_writes_then_reuses_a_complete_shard_dir(tmp_path, prefect_api):
    section = IngestSection(shard_dir=tmp_path / "digits", samples_per_shard=512, block_size=128)
    out = Path(ingest_dataset(SourceSection(), section))
    assert out == (tmp_path / "digits").resolve()
    assert pipeline.is_complete(out)
    index = pipeline.read_index(out)
    assert set(index.splits) == {"train", "test"}
    assert sum(s.num_samples for s in index.splits.values()) == 1797  # all of scikit-learn's digits
    assert len(index.splits["train"].shards) > 1  # 512 per shard: the split fanned out into several
    stamp = (out / pipeline.INDEX_NAME).stat().st_mtime_ns

    assert ingest_dataset(SourceSection(), section) == str(out)
    assert (out / pipeline.INDEX_NAME).stat().st_mtime_ns == stamp  # reused, not rewritten


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--train.mixed_precision", "fp8"], ["train.mixed_precision", "'no', 'bf16' or 'fp16'", "fp8"]),
        (["--config", "no/such/preset.yaml"], ["no/such/preset.yaml", "does not exist"]),
        (["--train.no_such_field", "1"], ["--train.no_such_field", "batch_size"]),
    ],
)
def test_demo_rejects_bad_config_before_any_work(tmp_path, args, expected):
    result = run([str(BIN / "vaepipe"), "demo", *args], cwd=tmp_path, timeout=60)
    assert result.returncode == 2, result.stderr
    for text in expected:
        assert text in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "mlflow.db").exists()


def _processes_mentioning(text: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["status"] != psutil.STATUS_ZOMBIE and text in " ".join(proc.info["cmdline"] or []):
            found.append(proc)
    return found


@pytest.mark.slow
def test_terminating_the_flow_kills_the_training_process_group(tmp_path):
    """SIGTERM (what a cancelled flow run receives) must take `accelerate launch` and its ranks down too."""
    out = tmp_path / "runs"
    log = tmp_path / "demo.log"
    cmd = [str(BIN / "vaepipe"), "demo", "--train.epochs", "10000", "--train.output_dir", str(out),
           "--ingest.shard_dir", str(tmp_path / "shards")]
    with open(log, "w") as f:
        demo = subprocess.Popen(cmd, cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not any("vae/train.py" in " ".join(p.cmdline()) for p in _processes_mentioning(str(out))):
            assert demo.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "training never started:\n" + log.read_text()
            time.sleep(0.5)
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(timeout=60) != 0
        deadline = time.monotonic() + 30
        while _processes_mentioning(str(out)):
            assert time.monotonic() < deadline, f"training outlived the flow: {_processes_mentioning(str(out))}"
            time.sleep(0.5)
    finally:
        stop(demo)
        for proc in _processes_mentioning(str(out)):  # leave nothing behind even when the test fails
            proc.kill()


@pytest.mark.server
def test_served_deployment_trains_and_registers(tmp_path, mlflow_uri):
    """`vaepipe serve` + `prefect deployment run train-vae/train-vae --watch` on loopback, MLflow server too."""
    from mlflow import MlflowClient

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    name = f"vae-test-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "serve.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri, "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    with open(log, "w") as f:
        serve = subprocess.Popen([str(BIN / "vaepipe"), "serve", "--port", str(port)], cwd=tmp_path, env=env,
                                 stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_http(f"{api}/deployments/name/train-vae/train-vae", timeout=180, proc=serve, log=log)
        assert (tmp_path / ".vaepipe" / "serve.pid").is_file()
        params = {"config": {
            "ingest": {"shard_dir": str(tmp_path / "shards"), "samples_per_shard": 512, "block_size": 128},
            "train": {"epochs": 1, "batch_size": 64, "output_dir": str(tmp_path / "runs")},
            "tracking": {"model_name": name, "experiment": "test-flows"},
        }}
        client_env = {"PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "client-home")}
        result = run([str(BIN / "prefect"), "deployment", "run", "train-vae/train-vae", "--watch",
                      "--params", json.dumps(params)], env=client_env, cwd=tmp_path, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr + log.read_text()
        assert "Completed" in result.stdout

        versions = MlflowClient(mlflow_uri).search_model_versions(f"name = '{name}'")
        assert [int(v.version) for v in versions] == [1]
        assert MlflowClient(mlflow_uri).get_model_version_by_alias(name, "champion").version == "1"
        artifact = run([str(BIN / "prefect"), "artifact", "inspect", "train-vae-report"], env=client_env,
                       cwd=tmp_path, timeout=60)
        assert f"{name}@champion" in artifact.stdout, artifact.stdout + artifact.stderr
    finally:
        run([str(BIN / "vaepipe"), "serve", "--stop"], cwd=tmp_path, timeout=120)
        stop(serve)
    assert not (tmp_path / ".vaepipe" / "serve.pid").exists()
    with pytest.raises(TimeoutError):  # nothing answers on the port any more
        wait_http(f"{api}/health", timeout=2)
