"""The pyfunc model's guards, without a tracking server: a model saved to tmp_path and loaded as MLflow loads it,
its `predict` called directly, and MLflow's own scoring app answering in-process (what `mlflow models serve`
runs), for every kind of bad input: over the limits, booleans, non-numbers, NaN and inf."""

from __future__ import annotations

import json
import re

import mlflow
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient  # httpx, which it needs, comes with prefect
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.pyfunc import scoring_server
from pydantic import ValidationError
from support.serving import strict_json

from vae.models.spec import build_from_spec, model_spec
from vae.registry.packaging import save_model
from vae.registry.pyfunc import ServingLimits

SPEC = model_spec("conv", (1, 8, 8), 2)
LIMITS = ServingLimits(max_samples=8, max_images=6, chunk_rows=4)  # small, so the tests cross them cheaply
NAN = float("nan")
IMAGES = np.random.default_rng(1).random((6, 1, 8, 8), dtype=np.float32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(directory of a tiny conv VAE saved with LIMITS, the module it was saved from)."""
    torch.manual_seed(0)
    model = build_from_spec(SPEC).eval()
    return save_model(model, SPEC, tmp_path_factory.mktemp("model") / "m", limits=LIMITS), model


@pytest.fixture(scope="module")
def pyfunc(saved):
    return mlflow.pyfunc.load_model(str(saved[0]))


with_nan = IMAGES.copy()
with_nan[0, 0, 0, 0] = NAN

# (input, params, the one-line reason); every case here returned output (200 over REST) or a stack trace before.
BAD = {
    "NaN pixel": (with_nan, {}, "mode 'reconstruct' expects images of shape (N, 1, 8, 8) with finite values, got 1 "
                                "NaN or infinite"),
    "inf pixel": (np.full((1, 1, 8, 8), np.inf), {"mode": "encode"}, "with finite values, got 64 NaN or infinite"),
    "NaN latent": ([[NAN, 0.1]], {"mode": "decode"}, "mode 'decode' expects latents of shape (N, 2) with finite "
                                                     "values, got 1 NaN or infinite"),
    "latent beyond float32": ([[1e300, 0.0]], {"mode": "decode"}, "got 1 NaN or infinite (or beyond float32)"),
    "latents too large": ([[3e38, 3e38]], {"mode": "decode"}, "mode 'decode' gave non-finite values (NaN or inf), "
                                                              "which JSON cannot carry: use smaller latents"),
    "boolean count": (True, {"mode": "sample"}, "a positive integer such as 16 or [16], got True"),
    "boolean count in a list": ([True], {"mode": "sample"}, "a positive integer such as 16 or [16], got True"),
    "image of another size": (np.zeros((1, 1, 16, 16), np.float32), {}, "mode 'reconstruct' expects images of shape "
                              "(N, 1, 8, 8), got (1, 1, 16, 16)"),  # dense latents: the training shape only
    "boolean images": (np.ones((1, 1, 8, 8), bool), {}, "expects images of shape (N, 1, 8, 8) as numbers, got "
                                                        "booleans"),
    "string latents": ([["a", "b"]], {"mode": "decode"}, "expects latents of shape (N, 2) as numbers, got dtype <U1"),
    "ragged images": ([[[[0.5, 0.5], [0.5]]]], {}, "got nested lists of unequal lengths"),
    "temperature inf": (2, {"mode": "sample", "temperature": float("inf")}, "param 'temperature' must be positive "
                                                                            "and finite"),
    "temperature NaN": (2, {"mode": "sample", "temperature": NAN}, "param 'temperature' must be positive and finite"),
    "temperature negative": (2, {"mode": "sample", "temperature": -1.0}, "got -1.0"),
    "seed beyond torch": (2, {"mode": "sample", "seed": 2**64}, "param 'seed' must be an integer from -2**63 to "
                                                                "2**64 - 1, got 18446744073709551616"),
    "a billion samples": (10**9, {"mode": "sample"}, "mode 'sample' draws at most 8 images per request (the model's "
                                                     "max_samples), got 1000000000"),
    "too many samples": ([9], {"mode": "sample"}, "draws at most 8 images per request"),
    "too many images": (np.zeros((7, 1, 8, 8), np.float32), {}, "with N at most 6 per request (the model's "
                                                                "max_images), got N = 7; split the batch"),
    "too many latents": (np.zeros((7, 2), np.float32), {"mode": "decode"}, "with N at most 6 per request"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_refused_with_a_one_line_reason(pyfunc, case):
    data, params, reason = BAD[case]
    with pytest.raises(MlflowException, match=re.escape(reason)) as caught:
        pyfunc.predict(data, params=params)
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE" and isinstance(caught.value, ValueError)
    assert "\n" not in caught.value.message


@pytest.fixture(scope="module")
def app(pyfunc):
    """MLflow's scoring app (`mlflow models serve` runs this one under uvicorn) around the saved model."""
    return TestClient(scoring_server.init(pyfunc))


def invoke(app: TestClient, inputs, params: dict) -> tuple[int, str]:
    # json.dumps writes float NaN/inf as bare tokens, as a careless client would send them.
    response = app.post("/invocations", content=json.dumps({"inputs": inputs, "params": params}),
                        headers={"Content-Type": "application/json"})
    return response.status_code, response.text


# MLflow's own parser refuses ragged lists before the model sees them, with its own one-line reason.
REST_REFUSAL = {"ragged images": ("BAD_REQUEST", "The requested array has an inhomogeneous shape")}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_over_rest_is_a_400_without_a_stack_trace(app, case):
    data, params, reason = BAD[case]
    code, reason = REST_REFUSAL.get(case, ("INVALID_PARAMETER_VALUE", reason))
    status, text = invoke(app, data.tolist() if isinstance(data, np.ndarray) else data, params)
    body = strict_json(text)
    assert status == 400, body
    assert body["error_code"] == code and "stack_trace" not in body
    assert "Traceback" not in text and "File \"" not in text
    # MLflow's server prefixes the reason with "Failed to predict data '<the input>'. \nError: ".
    assert reason in body["message"].splitlines()[-1]


def test_a_good_request_answers_strict_json(app, pyfunc):
    status, text = invoke(app, 3, {"mode": "sample", "seed": 1, "temperature": 0.5})
    assert status == 200
    np.testing.assert_array_equal(np.array(strict_json(text)["predictions"], np.float32),
                                  pyfunc.predict(3, params={"mode": "sample", "seed": 1, "temperature": 0.5}))


def test_a_failure_inside_the_model_is_a_500_whose_trace_stays_in_the_server_log(app, pyfunc, monkeypatch, caplog):
    vae = pyfunc.unwrap_python_model().model

    def broken(z):
        raise RuntimeError("secret internals")
    monkeypatch.setattr(vae, "decode", broken)
    with pytest.raises(MlflowException, match="mode 'decode' failed inside the model \\(RuntimeError\\)") as caught:
        pyfunc.predict(np.zeros((1, 2), np.float32), params={"mode": "decode"})
    assert caught.value.error_code == "INTERNAL_ERROR" and isinstance(caught.value.__cause__, RuntimeError)

    status, text = invoke(app, [[0.0, 0.0]], {"mode": "decode"})
    body = strict_json(text)
    assert status == 500 and "stack_trace" not in body and "secret internals" not in text
    assert "secret internals" in caplog.text  # logged with its traceback on the server


def test_work_runs_in_chunks_of_chunk_rows(pyfunc, saved, monkeypatch):
    vae, model = pyfunc.unwrap_python_model().model, saved[1]
    seen = []
    for name in ("encode", "decode"):
        real = getattr(vae, name)
        monkeypatch.setattr(vae, name, lambda x, real=real, name=name: seen.append((name, len(x))) or real(x))
    reconstruction = pyfunc.predict(IMAGES)  # 6 images, chunk_rows 4
    assert seen == [("encode", 4), ("decode", 4), ("encode", 2), ("decode", 2)]
    with torch.no_grad():
        whole = model.decode(model.encode(torch.from_numpy(IMAGES))[0]).numpy()
    np.testing.assert_allclose(reconstruction, whole, rtol=0, atol=1e-6)

    seen.clear()
    samples = pyfunc.predict(7, params={"mode": "sample", "seed": 3, "temperature": 0.5})
    assert seen == [("decode", 4), ("decode", 3)]
    u = torch.randn(7, 2, generator=torch.Generator().manual_seed(3))  # one draw: chunking does not change it
    with torch.no_grad():
        np.testing.assert_allclose(samples, model.decode(0.5 * u).numpy(), rtol=0, atol=1e-6)


def test_limits_are_stored_with_the_model_and_overridable_at_load(saved, monkeypatch):
    path = saved[0]
    assert Model.load(str(path)).flavors["python_function"]["config"] == LIMITS.model_dump()
    assert mlflow.pyfunc.load_model(str(path)).predict(8, params={"mode": "sample"}).shape == (8, 1, 8, 8)
    lower = mlflow.pyfunc.load_model(str(path), model_config={"max_samples": 2})
    with pytest.raises(MlflowException, match="draws at most 2 images"):
        lower.predict(3, params={"mode": "sample"})
    # What an operator sets for `mlflow models serve`, which loads the model through the same function.
    monkeypatch.setenv("MLFLOW_PYFUNC_INFERENCE_CONFIG", json.dumps({"max_images": 1}))
    with pytest.raises(MlflowException, match="with N at most 1 per request"):
        mlflow.pyfunc.load_model(str(path)).predict(IMAGES[:2])
    monkeypatch.setenv("MLFLOW_PYFUNC_INFERENCE_CONFIG", json.dumps({"chunk_rows": 0}))
    with pytest.raises(ValidationError, match="chunk_rows"):
        mlflow.pyfunc.load_model(str(path))


def test_default_limits():
    assert ServingLimits().model_dump() == {"max_samples": 1024, "max_images": 1024, "max_pixels": 2**24,
                                            "chunk_rows": 256, "tile_size": 1024}
    with pytest.raises(ValidationError, match="max_samples"):
        ServingLimits(max_samples=True)  # strict: a boolean is not a count
