"""vaepipe's commands meet the ecosystem's conventions, as subprocesses: `models` finds the server `vaepipe serve`
runs here and takes MLflow's `models:/` URIs; `demo` says first where MLflow logs; an Accelerate GPU config on a
host without a GPU stops on the first line."""

import json
import os
import signal
import subprocess

import pytest
import torch
from conftest import BIN, REPO
from support.registry import vaepipe_models

from flows import processes
from vae.launch.devices import missing_gpu


def without_tracking_uri() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID")}


@pytest.mark.usefixtures("mlflow_uri")
def test_pull_takes_the_models_uri_mlflow_shows(registered, tmp_path):
    name, _ = registered
    for ref, version in ((f"models:/{name}@challenger", 2), (f"models:/{name}/1", 1)):
        dest = tmp_path / ref.replace("/", "_").replace(":", "_")
        result = vaepipe_models("pull", ref, str(dest))
        assert result.returncode == 0, result.stderr
        assert f"pulled {name} version {version} into {dest}" in result.stdout


def serve_record(tmp_path, mlflow_url: str, pid: int) -> None:
    """The state file `vaepipe serve` writes, naming `pid` as its MLflow server at `mlflow_url`."""
    state_dir = tmp_path / ".vaepipe"
    state_dir.mkdir()
    child = {"pid": pid, "port": 0, "url": mlflow_url, "health": f"{mlflow_url}/health", **processes.identity(pid)}
    (state_dir / "serve.pid").write_text(json.dumps({
        "serve": pid, "serve_identity": processes.identity(pid), "host": "127.0.0.1",
        "api_url": "http://127.0.0.1:1/api", "children": {"mlflow-server": child}}))


def models_list(cwd) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "vaepipe"), "models", "list"], cwd=cwd, env=without_tracking_uri(),
                          capture_output=True, text=True, timeout=300)


def test_models_find_the_mlflow_server_vaepipe_serve_runs_here(registered, mlflow_uri, tmp_path):
    name, _ = registered
    # this test's process stands for the recorded server process: alive, and the one recorded (pid, start time)
    serve_record(tmp_path, mlflow_uri, os.getpid())
    result = models_list(tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"{name}  (2 versions)" in result.stdout.splitlines()


def test_models_ignore_a_record_of_a_server_that_is_gone(mlflow_uri, tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    serve_record(tmp_path, mlflow_uri, os.getpid())
    record = json.loads((tmp_path / ".vaepipe" / "serve.pid").read_text())
    record["children"]["mlflow-server"]["pid"] = gone.pid  # a process that ended: its URL is not trusted
    (tmp_path / ".vaepipe" / "serve.pid").write_text(json.dumps(record))
    result = models_list(tmp_path)
    assert result.returncode == 1
    assert f"error: no MLflow store at {tmp_path / 'mlflow.db'}" in result.stderr


def first_line_of_demo(tmp_path, env: dict[str, str]) -> str:
    """The demo's first line of output; the demo is stopped right after it (SIGTERM: it stops what it started)."""
    cmd = [str(BIN / "vaepipe"), "demo", "--config", str(REPO / "infra/configs/digits.yaml"),
           "--ingest.shard_dir", str(tmp_path / "shards"), "--train.output_dir", str(tmp_path / "runs")]
    demo = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        return demo.stdout.readline().strip()
    finally:
        demo.send_signal(signal.SIGTERM)
        demo.wait(timeout=120)


def test_demo_says_first_where_mlflow_logs(tmp_path):
    env = without_tracking_uri()
    assert first_line_of_demo(tmp_path, env) == (
        f"MLflow: the embedded store sqlite:///{tmp_path / 'mlflow.db'} (set MLFLOW_TRACKING_URI to log to a server "
        "instead)")
    server = "http://127.0.0.1:9"  # honoured, not replaced by the embedded store
    assert first_line_of_demo(tmp_path, {**env, "MLFLOW_TRACKING_URI": server}) == (
        f"MLflow: {server} (MLFLOW_TRACKING_URI)")


needs_cpu_host = pytest.mark.skipif(torch.cuda.is_available(), reason="about hosts without a CUDA device")


@needs_cpu_host
def test_a_gpu_config_on_a_host_without_gpu_stops_on_the_first_line(tmp_path):
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(REPO / "infra/accelerate/1gpu.yaml"),
           str(REPO / "vae/train.py"), "--config", str(REPO / "infra/configs/digits.yaml"),
           "--train.output_dir", str(tmp_path / "run")]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert result.stderr.splitlines()[0].startswith(
        "error: this launch asks for GPU 0 and bf16 mixed precision (an Accelerate config for GPUs")
    assert not (tmp_path / "run").exists()  # nothing trained


@needs_cpu_host
@pytest.mark.parametrize(("env", "refused"), [
    ({"ACCELERATE_USE_CPU": "False", "CUDA_VISIBLE_DEVICES": "0", "ACCELERATE_MIXED_PRECISION": "bf16"}, True),
    ({"ACCELERATE_USE_CPU": "False", "ACCELERATE_MIXED_PRECISION": "fp16"}, True),
    ({"ACCELERATE_USE_CPU": "True", "CUDA_VISIBLE_DEVICES": "0", "ACCELERATE_MIXED_PRECISION": "bf16"}, False),
    ({"ACCELERATE_USE_CPU": "1", "ACCELERATE_MIXED_PRECISION": "no"}, False),  # two CPU ranks (gloo)
    ({"ACCELERATE_USE_CPU": "False", "ACCELERATE_MIXED_PRECISION": "no"}, False),  # a plain accelerate launch
    ({"CUDA_VISIBLE_DEVICES": "0"}, False),  # not set by a launcher: someone's shell
])
def test_which_launches_are_refused_without_a_gpu(env, refused):
    assert (missing_gpu(env) is not None) == refused
