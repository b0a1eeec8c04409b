"""`mlflow models serve` on a registered champion, as a real subprocess on loopback: every mode over REST
returns what in-process `predict` returns, bad input is a 400 with a reason and no stack trace (the body
always strict JSON), and the server's whole process group is gone afterwards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid

import mlflow
import numpy as np
import pytest
import torch
from conftest import BIN, free_port, wait_http
from support.serving import strict_json

from vae.models.spec import build_from_spec, model_spec
from vae.registry.packaging import log_model
from vae.registry.versions import register_version
from vae.tracking.store import ensure_experiment

pytestmark = pytest.mark.server

SPEC = model_spec("conv", (1, 8, 8), 2)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (it forks uvicorn workers), SIGKILL what is left after 20 s."""
    with_kill = [(signal.SIGTERM, 20), (signal.SIGKILL, 10)]
    for sig, grace in with_kill:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and group_alive(proc):
            time.sleep(0.2)
        if not group_alive(proc):
            break
    proc.wait(timeout=10)


def group_alive(proc: subprocess.Popen) -> bool:
    proc.poll()  # reap the leader, or it lingers as a zombie in its group
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def served(mlflow_uri, tmp_path):
    """A fresh model registered as champion and served from the registry: (base URL, in-process pyfunc, proc)."""
    torch.manual_seed(0)
    run = mlflow.MlflowClient().create_run(ensure_experiment("serving-tests", mlflow_uri))
    uri = log_model(build_from_spec(SPEC), SPEC, run.info.run_id)
    name = f"vae-test-{uuid.uuid4().hex[:8]}"
    register_version(uri, name, score=100.0, run_id=run.info.run_id)
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{name}@champion", "--env-manager", "local",
             "--host", "127.0.0.1", "--port", str(port)],
            # MLflow starts `uvicorn` by name: the venv's bin must be on PATH, as in an activated venv.
            env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
            cwd=tmp_path, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,  # its own group, so stopping it reaches the workers
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", timeout=180, proc=proc, log=log)
        yield f"http://127.0.0.1:{port}", mlflow.pyfunc.load_model(f"models:/{name}@champion"), proc
    finally:
        stop_group(proc)


def invoke(url: str, inputs, params: dict) -> tuple[int, dict]:
    """POST to /invocations (float NaN and inf sent as the bare tokens json.dumps writes); (status, the body read
    as strict JSON, so a response with NaN in it fails)."""
    body = json.dumps({"inputs": inputs, "params": params}).encode()
    request = urllib.request.Request(f"{url}/invocations", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, strict_json(response.read())
    except urllib.error.HTTPError as err:
        return err.code, strict_json(err.read())


def test_every_mode_over_rest_equals_predict_in_process(served):
    url, pyfunc, proc = served
    x = np.random.default_rng(1).random((3, 1, 8, 8), dtype=np.float32)
    z = pyfunc.predict(x, params={"mode": "encode"})
    cases = {  # mode -> (input, params), the same for REST (as JSON) and in-process
        "reconstruct": (x, {}),
        "encode": (x, {"mode": "encode"}),
        "decode": (z, {"mode": "decode"}),
        "sample": (np.array([5]), {"mode": "sample", "seed": 3, "temperature": 0.7}),
    }
    for mode, (data, params) in cases.items():
        status, body = invoke(url, data.tolist(), params)
        assert status == 200, (mode, body)
        served_out = np.array(body["predictions"], dtype=np.float32)
        expected = pyfunc.predict(data, params=params)
        assert served_out.shape == expected.shape == {"encode": (3, 2), "sample": (5, 1, 8, 8)}.get(mode, (3, 1, 8, 8))
        np.testing.assert_array_equal(served_out, expected, err_msg=mode)  # float32 survives JSON exactly

    status, body = invoke(url, x.tolist(), {"mode": "blur"})
    assert status == 400 and "unknown mode 'blur'; valid: reconstruct, encode, decode, sample" in body["message"]

    refused = [  # (input, params, the reason: the message's last line, after MLflow's prefix naming the input)
        (10**9, {"mode": "sample"}, "mode 'sample' draws at most 1024 images per request (the model's max_samples), "
                                    "got 1000000000; ask in several requests with different seeds"),
        (True, {"mode": "sample"}, "got True"),
        ([["a", "b"]], {"mode": "decode"}, "expects latents of shape (N, 2) as numbers, got dtype <U1"),
        (2, {"mode": "sample", "temperature": float("inf")}, "param 'temperature' must be positive and finite"),
        ((z * np.nan).tolist(), {"mode": "decode"}, "mode 'decode' expects latents of shape (N, 2) with finite values, "
                                                    "got 6 NaN or infinite"),
    ]
    for data, params, reason in refused:
        status, body = invoke(url, data, params)
        assert status == 400 and reason in body["message"].splitlines()[-1], (params, body)
        assert "stack_trace" not in body and "Traceback" not in json.dumps(body)

    stop_group(proc)
    assert not group_alive(proc)
    with pytest.raises(TimeoutError):  # nothing answers on the port any more
        wait_http(f"{url}/ping", timeout=2)
