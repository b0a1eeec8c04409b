"""`aekl` through the trainer (vae/objective.py AeklObjective): every loss on (L1, KL, LPIPS with random backbone
weights, the PatchGAN discriminator from step 1 with the adaptive weight), both optimisers and EMAs in the
checkpoints, and exact resume after SIGTERM. A tiny AutoencoderKL on 32-px crops of scikit-learn's photos, CPU."""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import pipeline
from vae import checkpoint, objective
from vae.config import load_config
from vae.preemption import PREEMPTED_EXIT

SIDE = 32  # px; 32 train crops in batches of 16: two optimiser steps per epoch


@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory) -> Path:
    """32 train and 16 test crops (32 x 32 x 3) of the two photographs bundled with scikit-learn."""
    from sklearn.datasets import load_sample_images

    root = tmp_path_factory.mktemp("photos")
    crops = [image[r : r + SIDE, c : c + SIDE] for image in load_sample_images().images
             for r in range(0, 6 * 64, 64) for c in range(0, 4 * 128, 128)]  # 24 per photo, 48 in all
    np.save(root / "train.npy", np.stack(crops[:32]))
    np.save(root / "test.npy", np.stack(crops[32:]))
    files = {"train": str(root / "train.npy"), "test": str(root / "test.npy")}
    pipeline.ingest("arrays", {"files": files}, root / "shards", 16, 16, progress=False)
    return root / "shards"


@pytest.fixture(scope="module")
def vgg_weights(tmp_path_factory) -> Path:
    """torchvision's VGG16 `features` with random weights, as a local file (LPIPS's backbone; no download)."""
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("vgg") / "vgg16.safetensors"
    save_file({f"features.{k}": v.contiguous() for k, v in make_layers(cfgs["D"]).state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def config(shards: Path, out: Path, vgg: Path, *overrides: str):
    return load_config(None, [
        "--ingest.shard_dir", str(shards), "--train.output_dir", str(out), "--train.batch_size", "16",
        "--train.epochs", "2", "--train.ema_decay", "0.9", "--train.log_every", "1", "--tracking.finalize", "false",
        "--model.arch", "aekl", "--model.channels", "[8, 16, 16]", "--model.layers_per_block", "1",
        "--model.norm_groups", "4", "--model.attention", "false", "--model.latent_dim", "4",
        "--loss.likelihood", "gaussian", "--loss.aekl.perceptual_weight", "1.0", "--loss.aekl.lpips_weights", str(vgg),
        "--loss.aekl.disc_weight", "0.5", "--loss.aekl.disc_start", "1", "--loss.aekl.disc_layers", "2",
        "--loss.aekl.disc_channels", "8", "--loss.aekl.disc_lr", "0.0005", *overrides,
    ])


@contextlib.contextmanager
def in_process(tracking_uri: str, sigterm_at: int | None = None):
    """The trainer in this process; `sigterm_at`: SIGTERM reaches its handler during that optimiser step."""
    handlers = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(signal, "signal", lambda sig, handler: handlers.__setitem__(sig, handler))
        mp.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        if sigterm_at is not None:
            step = objective.AeklObjective.step

            def interrupted(self, models, x, at, backward):
                if at == sigterm_at:
                    handlers[signal.SIGTERM](signal.SIGTERM, None)
                return step(self, models, x, at, backward)

            mp.setattr(objective.AeklObjective, "step", interrupted)
        yield


def train(cfg) -> None:
    from vae.trainer import train

    train(cfg)


def tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(f).items()})
    for f in sorted(path.glob("optimizer*.bin")):
        state = torch.load(f, map_location="cpu", weights_only=True)["state"]
        out.update({f"{f.name}:{i}:{k}": v for i, s in state.items() for k, v in s.items() if torch.is_tensor(v)})
    return out


def test_aekl_every_loss_on_and_exact_sigterm_resume(tmp_path, photo_shards, vgg_weights, tracking_uri):
    with in_process(tracking_uri):
        train(config(photo_shards, tmp_path / "whole", vgg_weights))
    whole = checkpoint.latest(tmp_path / "whole")
    assert whole.name == "step-000000004"
    assert {"model.safetensors", "model_1.safetensors", "optimizer.bin", "optimizer_1.bin", "ema.safetensors",
            "ema_discriminator.safetensors"} <= {p.name for p in whole.iterdir()}
    meta = checkpoint.read_meta(whole)
    assert meta["models"] == ["model", "discriminator"] and meta["model_spec"]["arch"] == "aekl"
    client = mlflow.MlflowClient(tracking_uri)
    logged = {name: [m.value for m in client.get_metric_history(meta["mlflow_run_id"], f"train/{name}")]
              for name in ("perceptual", "kl", "g_loss", "d_weight", "disc_loss", "grad_norm_discriminator")}
    # step 0: no GAN yet; from step 1 on the generator's GAN term, the adaptive weight and the discriminator count
    assert logged["g_loss"][0] == logged["d_weight"][0] == logged["disc_loss"][0] == 0
    assert all(v != 0 for name in ("g_loss", "d_weight", "disc_loss") for v in logged[name][1:])
    assert all(v > 0 for v in logged["perceptual"] + logged["kl"])
    assert client.get_metric_history(meta["mlflow_run_id"], "val/psnr")[-1].value > 0
    lr = torch.load(whole / "optimizer_1.bin", weights_only=True)["param_groups"][0]["lr"]
    assert lr == pytest.approx(5e-4)  # loss.aekl.disc_lr

    with in_process(tracking_uri, sigterm_at=2), pytest.raises(SystemExit) as stopped:
        train(config(photo_shards, tmp_path / "cut", vgg_weights))
    assert stopped.value.code == PREEMPTED_EXIT
    assert checkpoint.read_meta(checkpoint.latest(tmp_path / "cut"))["reason"] == "preempted"
    with in_process(tracking_uri):
        train(config(photo_shards, tmp_path / "cut", vgg_weights, "--train.resume", "true"))
    resumed = checkpoint.latest(tmp_path / "cut")
    assert resumed.name == whole.name
    expected, got = tensors(whole), tensors(resumed)
    assert expected.keys() == got.keys()
    assert any(k.startswith("model_1.safetensors:") and "running_mean" in k for k in expected)  # BatchNorm stats
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
