"""aekl as a diffusers folder: export, `AutoencoderKL.from_pretrained` in another process, the registered
MLflow model (spatial latents, the folder as an artifact) and `vaepipe models pull --format diffusers`."""

from __future__ import annotations

import json
import uuid

import mlflow
import numpy as np
import pytest
import torch
from conftest import BIN, run
from support.reconstruct import reconstruct_elsewhere

from vae.models.spec import build_from_spec, model_spec
from vae.registry.diffusers import export_diffusers
from vae.registry.packaging import log_model
from vae.registry.versions import register_version
from vae.tracking.store import ensure_experiment

SPEC = model_spec("aekl", (3, 32, 24), 4, channels=[8, 16, 16], layers_per_block=1, norm_groups=4, attention=True,
                  likelihood="gaussian")
STATS = {"shift_factor": 0.25, "scaling_factor": 1.5, "mean": [0.1, 0.2, 0.3, 0.4], "std": [1.0, 0.9, 0.8, 0.7]}

# Run in a fresh interpreter, with diffusers alone: load the folder and reconstruct x.npy into out.npy.
def trained(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_from_spec(SPEC).eval()
    with torch.no_grad():  # not the initial weights (diffusers zero-inits nothing, but be sure all of them count)
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def test_export_then_from_pretrained_in_another_process_reconstructs_equally(tmp_path):
    model = trained()
    folder = export_diffusers(model, tmp_path / "vae", STATS)
    assert {p.name for p in folder.iterdir()} == {"config.json", "diffusion_pytorch_model.safetensors"}
    config = json.loads((folder / "config.json").read_text())
    assert (config["scaling_factor"], config["shift_factor"], config["latents_std"]) == (1.5, 0.25, STATS["std"])
    assert config["block_out_channels"] == [8, 16, 16] and config["latent_channels"] == 4
    assert "scaling_factor" not in {k for k, v in model.vae.config.items() if v == 1.5}  # the model is unchanged
    x = np.random.default_rng(0).random((2, 3, 32, 24), dtype=np.float32)
    with torch.no_grad():
        expected = model.decode_latents(model.encode_latents(torch.from_numpy(x))).numpy()
    np.testing.assert_allclose(reconstruct_elsewhere(folder, x, tmp_path), expected, atol=1e-6, rtol=0)
    with pytest.raises(FileExistsError, match="is not empty"):
        export_diffusers(model, folder)


def test_an_exported_folder_is_a_pretrained_start_with_the_same_latents(tmp_path):
    """diffusers folder -> `model.pretrained` of a new run: its architecture fills the section where the model is
    built (validation reads no disk), and the encoder, frozen, gives bit-equal latents."""
    model = trained(1)
    folder = export_diffusers(model, tmp_path / "vae", STATS)
    assert json.loads((folder / "config.json").read_text())["scaling_factor"] == 1.5
    from vae.config import validate
    from vae.models import build_model
    from vae.training.trained import resolve_model

    cfg = validate({"model": {"arch": "aekl", "pretrained": str(folder), "train_encoder": False}})
    assert cfg.model.channels == (128, 256, 512, 512)  # validated only: the folder is not read yet
    cfg = resolve_model(cfg)
    assert list(cfg.model.channels) == SPEC["options"]["channels"]
    again = build_model("aekl", (3, 32, 24), cfg.model.latent_dim, **cfg.model.constructor_options())
    x = torch.rand(2, 3, 32, 24)
    with torch.no_grad():
        assert torch.equal(again.eval().encode_latents(x), model.encode_latents(x))
    assert not any(p.requires_grad for p in again.vae.encoder.parameters())


@pytest.mark.server
def test_registered_aekl_encodes_decodes_and_pulls_as_a_diffusers_folder(mlflow_uri, tmp_path):
    model = trained(2)
    run_ = mlflow.MlflowClient().create_run(ensure_experiment("aekl-export", mlflow_uri))
    name = f"vae-aekl-{uuid.uuid4().hex[:8]}"
    register_version(log_model(model, {**SPEC, "latent_stats": STATS}, run_.info.run_id), name, 1.0, run_.info.run_id)
    x = np.random.default_rng(1).random((2, 3, 32, 24), dtype=np.float32)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}/1")
    latents = pyfunc.predict(x, params={"mode": "encode"})
    with torch.no_grad():
        expected = model.encode_latents(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(latents, expected)  # spatial: (N, 4, 8, 6)
    np.testing.assert_array_equal(pyfunc.predict(latents, params={"mode": "decode"}), pyfunc.predict(x))
    dest = tmp_path / "pulled"
    result = run([str(BIN / "vaepipe"), "models", "pull", name, str(dest), "--format", "diffusers"], timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads((dest / "config.json").read_text())["scaling_factor"] == 1.5
    # the pyfunc runs under inference_mode, in chunks: float sums in another order, up to 3e-6 apart (seen)
    np.testing.assert_allclose(reconstruct_elsewhere(dest, x, tmp_path), pyfunc.predict(x), atol=1e-5, rtol=0)
    # a model without a diffusers folder is refused, naming why, and nothing is written
    other = f"vae-mlp-{uuid.uuid4().hex[:8]}"
    mlp = model_spec("mlp", (1, 8, 8), 2, hidden_dim=8)
    register_version(log_model(build_from_spec(mlp), mlp, run_.info.run_id), other, 1.0, run_.info.run_id)
    result = run([str(BIN / "vaepipe"), "models", "pull", other, str(tmp_path / "no"), "--format", "diffusers"],
                 timeout=300)
    assert result.returncode == 1 and "carries no diffusers folder: only model.arch aekl" in result.stderr
    assert not (tmp_path / "no").exists()
