"""MLflow packaging and registry against a real loopback server: log, register, aliases, every mode, load back."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException

from vae.models import MODELS
from vae.models.spec import build_from_spec, model_spec
from vae.objectives import PSNR
from vae.registry.packaging import load_torch_model, log_model
from vae.registry.versions import register_version
from vae.tracking.store import ensure_experiment

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parents[1]

SPEC = model_spec("conv", (1, 8, 8), 2)


@pytest.fixture
def logged(mlflow_uri):
    """A tiny conv VAE logged into a fresh run: (module, run_id, model_uri)."""
    torch.manual_seed(0)
    model = build_from_spec(SPEC).eval()
    run = mlflow.MlflowClient().create_run(ensure_experiment("registry-tests", mlflow_uri))
    return model, run.info.run_id, log_model(model, SPEC, run.info.run_id)


def images(n: int = 4) -> np.ndarray:
    return np.random.default_rng(1).random((n, *SPEC["image_shape"]), dtype=np.float32)  # (N, 1, 8, 8)


def unique_name() -> str:
    return f"vae-test-{uuid.uuid4().hex[:8]}"


# Run in a fresh interpreter that cannot see the installed vaepipe: `vae` may only come from the code the
# model carries (MLflow puts it on sys.path while loading). argv: repo, model URI, input .npy, output .npy.
LOAD_ELSEWHERE = r"""
import importlib.machinery, site, sys
from pathlib import Path
import numpy as np

hidden = {Path(p).resolve() for p in [*site.getsitepackages(), sys.argv[1]]}

class OnlyFromModel:
    def find_spec(self, name, path=None, target=None):
        if name != "vae":
            return None
        # Only real directories: the editable install also hooks a pseudo-entry into sys.path.
        visible = [p for p in sys.path if p and Path(p).is_dir() and Path(p).resolve() not in hidden]
        spec = importlib.machinery.PathFinder.find_spec(name, visible)
        if spec is None:
            raise ModuleNotFoundError("the installed vae is hidden in this test", name=name)
        return spec

sys.meta_path.insert(0, OnlyFromModel())
import mlflow
model = mlflow.pyfunc.load_model(sys.argv[2])
np.save(sys.argv[4], model.predict(np.load(sys.argv[3])))
import vae
print(vae.__file__)
"""


def test_champion_loads_and_predicts_in_a_fresh_process(logged, mlflow_uri, tmp_path):
    model, run_id, uri = logged
    assert uri.startswith("models:/m-")  # MLflow 3: a logged model, not runs:/<run>/model
    name = unique_name()
    version = register_version(uri, name, score=100.0, run_id=run_id)
    assert version.champion and version.version == 1 and version.uri == f"models:/{name}/1"

    x = images()
    with torch.no_grad():
        mu, _ = model.encode(torch.from_numpy(x))
        expected = model.decode(mu).numpy()
    np.save(tmp_path / "x.npy", x)
    result = subprocess.run(
        [sys.executable, "-c", LOAD_ELSEWHERE, str(REPO), f"models:/{name}@champion",
         str(tmp_path / "x.npy"), str(tmp_path / "out.npy")],
        env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri},
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    vae_file = result.stdout.strip().splitlines()[-1]
    assert Path(vae_file).parts[-3:] == ("code", "vae", "__init__.py"), vae_file  # the model's own copy
    out = np.load(tmp_path / "out.npy")
    assert out.shape == (4, 1, 8, 8) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)


def test_champion_moves_only_to_a_strictly_better_nll_and_challenger_to_every_new_version(logged):
    _, run_id, uri = logged
    name = unique_name()
    client = mlflow.MlflowClient()

    def aliases() -> dict[str, str]:
        return client.get_registered_model(name).aliases

    first = register_version(uri, name, score=100.0, run_id=run_id)
    assert (first.version, first.champion, first.previous_champion_score) == (1, True, None)
    assert aliases() == {"champion": "1", "challenger": "1"}

    worse = register_version(uri, name, score=120.0, run_id=run_id)
    assert (worse.version, worse.champion, worse.previous_champion_score) == (2, False, 100.0)
    assert aliases() == {"champion": "1", "challenger": "2"}

    tie = register_version(uri, name, score=100.0, run_id=run_id)  # equal is not better
    assert not tie.champion and aliases() == {"champion": "1", "challenger": "3"}

    better = register_version(uri, name, score=90.0, run_id=run_id, tags={"val_elbo": "-95.5", "git_commit": "abc"})
    assert (better.version, better.champion, better.previous_champion_score) == (4, True, 100.0)
    assert aliases() == {"champion": "4", "challenger": "4"}
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.tags == {"val_nll": "90.0", "val_elbo": "-95.5", "git_commit": "abc"}
    assert client.get_run(run_id).data.tags["registered_model_version"] == f"{name}/4"


def test_a_higher_is_better_criterion_crowns_the_highest_psnr_and_refuses_mixing_with_the_nll(logged):
    """aekl competes on val/psnr (tag val_psnr), where higher is better: the NLL's direction would crown the
    worst; and a PSNR cannot be compared with a champion holding an NLL."""
    _, run_id, uri = logged
    name = unique_name()
    client = mlflow.MlflowClient()
    assert register_version(uri, name, 20.0, run_id, criterion=PSNR).champion
    lower = register_version(uri, name, 19.5, run_id, criterion=PSNR)
    assert (lower.champion, lower.previous_champion_score) == (False, 20.0)
    higher = register_version(uri, name, 21.0, run_id, criterion=PSNR)
    assert higher.champion and client.get_registered_model(name).aliases == {"champion": "3", "challenger": "3"}
    assert client.get_model_version(name, "3").tags == {"val_psnr": "21.0"}
    elbo = unique_name()
    register_version(uri, elbo, score=100.0, run_id=run_id)
    with pytest.raises(ValueError, match=r"competes on val/nll_iwae .* on val/psnr .*\(--tracking.model_name\)"):
        register_version(uri, elbo, 30.0, run_id, criterion=PSNR)
    assert len(client.search_model_versions(f"name='{elbo}'")) == 1  # refused before registering


def test_versions_registered_by_hand_do_not_compete(logged):
    _, run_id, uri = logged
    name = unique_name()
    client = mlflow.MlflowClient()
    register_version(uri, name, score=100.0, run_id=run_id)
    mlflow.register_model(uri, name)  # version 2, no val_nll tag: neither champion nor challenger
    third = register_version(uri, name, score=110.0, run_id=run_id)
    assert third.version == 3 and not third.champion
    assert client.get_registered_model(name).aliases == {"champion": "1", "challenger": "3"}


def test_a_champion_without_its_nll_tag_is_a_loud_failure(logged):
    _, run_id, uri = logged
    name = unique_name()
    client = mlflow.MlflowClient()
    untagged = mlflow.register_model(uri, name)  # registered by hand, outside `register`
    # The model exists but nobody holds the alias: the first `register` call takes it.
    assert register_version(uri, name, score=100.0, run_id=run_id).champion
    client.set_registered_model_alias(name, "champion", untagged.version)
    with pytest.raises(ValueError, match=r"version 1 holds the alias 'champion' but has no 'val_nll' tag.*"
                                         r"set_model_version_tag"):
        register_version(uri, name, score=90.0, run_id=run_id)
    assert len(client.search_model_versions(f"name='{name}'")) == 2  # refused before registering


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("first", [True, False])
def test_a_non_finite_nll_registers_the_model_without_an_alias_and_says_why(logged, bad, first):
    """A NaN NLL once cost a whole run (the registration refused it, nothing was kept): the version is
    registered, without the val_nll tag, takes neither alias, and the run and version say why."""
    _, run_id, uri = logged
    name = unique_name()
    client = mlflow.MlflowClient()
    if not first:
        register_version(uri, name, score=100.0, run_id=run_id)
    why = "val/nll_iwae is nan: the IWAE estimate was not finite for 3 of 40 images"
    with pytest.warns(UserWarning, match="takes no alias: val/nll_iwae is nan"):
        version = register_version(uri, name, score=bad, run_id=run_id, tags={"git_commit": "abc"},
                                   nonfinite_reason=why)
    assert version.version == (1 if first else 2) and not version.champion
    tags = client.get_model_version(name, str(version.version)).tags
    assert tags == {"git_commit": "abc", "val_nll_nonfinite": why}
    assert client.get_registered_model(name).aliases == ({} if first else {"champion": "1", "challenger": "1"})
    run_tags = client.get_run(run_id).data.tags
    assert run_tags["val_nll_nonfinite"] == why and run_tags["registered_model_version"] == f"{name}/{version.version}"
    assert register_version(uri, name, score=105.0, run_id=run_id).champion == first  # the next finite one competes


def test_load_torch_model_reproduces_the_module(logged):
    model, run_id, uri = logged
    name = unique_name()
    register_version(uri, name, score=100.0, run_id=run_id)
    loaded = load_torch_model(f"models:/{name}@champion")
    assert type(loaded) is type(model) and not loaded.training
    x = torch.from_numpy(images())
    with torch.no_grad():
        assert torch.equal(loaded.encode(x)[0], model.encode(x)[0])
        assert torch.equal(loaded.decode(torch.ones(3, 2)), model.decode(torch.ones(3, 2)))


def test_log_model_inside_the_active_run_and_refuses_another(mlflow_uri):
    model = build_from_spec(SPEC)
    experiment = ensure_experiment("registry-tests", mlflow_uri)
    with mlflow.start_run(experiment_id=experiment) as run:
        uri = log_model(model, SPEC, run.info.run_id)
        assert mlflow.active_run().info.run_id == run.info.run_id  # still ours, not ended by log_model
        with pytest.raises(ValueError, match="is active"):
            log_model(model, SPEC, "0" * 32)
    assert torch.equal(load_torch_model(uri).mu.weight, model.mu.weight)


def test_the_signature_declares_the_params_and_leaves_the_input_to_the_mode(logged):
    _, _, uri = logged
    signature = mlflow.models.get_model_info(uri).signature
    assert signature.inputs is None
    assert {p.name: (p.dtype.name, p.default) for p in signature.params.params} == {
        "mode": ("string", "reconstruct"), "seed": ("long", 0), "temperature": ("double", 1.0)}
    pyfunc = mlflow.pyfunc.load_model(uri)
    with pytest.raises(MlflowException, match="seed"):  # MLflow type-checks the params against the signature
        pyfunc.predict(3, params={"mode": "sample", "seed": "abc"})


ZEROS = np.zeros((2, 1, 8, 8), np.float32)


@pytest.mark.parametrize(("data", "params", "message"), [
    (ZEROS[:, :, :7, :7], {}, "mode 'reconstruct' expects images of shape (N, 1, 8, 8), got (2, 1, 7, 7)"),
    (ZEROS.reshape(2, 64), {"mode": "encode"}, "mode 'encode' expects images of shape (N, 1, 8, 8), got (2, 64)"),
    (np.zeros((2, 3), np.float32), {"mode": "decode"}, "mode 'decode' expects latents of shape (N, 2), got (2, 3)"),
    (ZEROS + 255, {}, "pixel values in [0, 1] (divide uint8 images by 255)"),
    (ZEROS, {"mode": "sample"}, "a positive integer such as 16 or [16], got an array of shape (2, 1, 8, 8)"),
    (0, {"mode": "sample"}, "got 0"),
    (2.5, {"mode": "sample"}, "got 2.5"),
    (3, {"mode": "sample", "temperature": 0.0}, "param 'temperature' must be positive"),
    (ZEROS, {"mode": "blur"}, "unknown mode 'blur'; valid: reconstruct, encode, decode, sample"),
])
def test_bad_input_names_what_the_mode_expects(logged, data, params, message):
    _, _, uri = logged
    with pytest.raises(ValueError, match=re.escape(message)):
        mlflow.pyfunc.load_model(uri).predict(data, params=params)


def test_every_mode_through_predict(logged):
    model, _, uri = logged
    pyfunc = mlflow.pyfunc.load_model(uri)
    x = images(5)
    mu = pyfunc.predict(x, params={"mode": "encode"})
    assert mu.shape == (5, 2) and mu.dtype == np.float32
    with torch.no_grad():
        np.testing.assert_array_equal(mu, model.encode(torch.from_numpy(x))[0].numpy())
    reconstruction = pyfunc.predict(x)
    assert reconstruction.shape == (5, 1, 8, 8) and reconstruction.dtype == np.float32
    np.testing.assert_array_equal(pyfunc.predict(mu, params={"mode": "decode"}), reconstruction)  # exactly

    samples = pyfunc.predict(4, params={"mode": "sample", "seed": 7, "temperature": 0.5})
    assert samples.shape == (4, 1, 8, 8) and samples.dtype == np.float32
    assert samples.min() >= 0 and samples.max() <= 1
    u = torch.randn(4, 2, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        np.testing.assert_array_equal(samples, model.decode(0.5 * u).numpy())
    # The count may come as a number or a one-element array (JSON [4]); the default seed is 0, fixed.
    np.testing.assert_array_equal(pyfunc.predict([4], params={"mode": "sample", "seed": 7, "temperature": 0.5}),
                                  samples)
    assert np.array_equal(pyfunc.predict(4, params={"mode": "sample"}),
                          pyfunc.predict(4, params={"mode": "sample", "seed": 0}))
    assert not np.array_equal(pyfunc.predict(4, params={"mode": "sample", "seed": 1}),
                              pyfunc.predict(4, params={"mode": "sample", "seed": 2}))


# Small instances of every registered architecture, with a non-Bernoulli head on colour images for two of them.
ROUND_TRIP = {
    "mlp": model_spec("mlp", (1, 8, 8), 2, hidden_dim=16),
    "conv": model_spec("conv", (1, 8, 8), 2, likelihood="gaussian_learned"),
    "resnet": model_spec("resnet", (3, 8, 8), 3, width=8, likelihood="logistic_mixture", mixtures=2),
    "hvae": model_spec("hvae", (3, 8, 8), 2, width=8, groups=2, likelihood="logistic_mixture", mixtures=2),
    "aekl": model_spec("aekl", (3, 8, 8), 4, channels=[4, 4, 4], layers_per_block=1, norm_groups=2, attention=False,
                       likelihood="gaussian"),
}


def test_round_trip_covers_the_registry():
    assert set(ROUND_TRIP) == set(MODELS)


@pytest.mark.parametrize("arch", sorted(ROUND_TRIP))
def test_every_architecture_reloads_with_identical_outputs(arch, mlflow_uri):
    spec = ROUND_TRIP[arch]
    torch.manual_seed(0)
    model = build_from_spec(spec).eval()
    with torch.no_grad():  # trained weights are not all-zero in the last layers as a fresh resnet/hvae's are
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    run = mlflow.MlflowClient().create_run(ensure_experiment("registry-tests", mlflow_uri))
    uri = log_model(model, spec, run.info.run_id)
    x = np.random.default_rng(3).random((3, *spec["image_shape"]), dtype=np.float32)
    u = np.random.default_rng(4).standard_normal((3, model.latent_size)).astype(np.float32)
    with torch.no_grad():
        mu = model.encode(torch.from_numpy(x))[0]
        expected = {"reconstruct": model.decode(mu).numpy(), "encode": mu.numpy(),
                    "decode": model.decode(torch.from_numpy(u)).numpy()}
    pyfunc = mlflow.pyfunc.load_model(uri)
    np.testing.assert_array_equal(pyfunc.predict(x), expected["reconstruct"])
    # (aekl's encode keeps its latents spatial: (N, c, h, w))
    np.testing.assert_array_equal(pyfunc.predict(x, params={"mode": "encode"}).reshape(len(x), -1), expected["encode"])
    np.testing.assert_array_equal(pyfunc.predict(u, params={"mode": "decode"}), expected["decode"])
    loaded = load_torch_model(uri)
    assert type(loaded) is type(model) and loaded.head == model.head
    state, original = loaded.state_dict(), model.state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in state)
