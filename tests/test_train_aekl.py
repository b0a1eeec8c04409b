"""`aekl` through the trainer (vae/objectives/aekl/objective.py): every loss on (L1, KL, LPIPS with random backbone
weights, the PatchGAN discriminator from step 1 with the adaptive weight), both optimisers and EMAs in the
checkpoints, and exact resume after SIGTERM; the post-training path (aekl evaluation, registration on PSNR, the
diffusers folder pulled and loaded by diffusers alone); decoder-only fine-tuning from a diffusers folder. A tiny
AutoencoderKL on 32-px crops of scikit-learn's photos, CPU."""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from conftest import BIN, run
from PIL import Image
from safetensors.torch import load_file, save_file
from support.journal import logged_image_steps
from support.reconstruct import reconstruct_elsewhere
from support.training import checkpoint_tensors, in_process

import pipeline
from vae.config import load_config
from vae.training import checkpoint
from vae.training.preemption import PREEMPTED_EXIT
from vae.training.trained import load_checkpoint
from vae.training.trainer import GRID_KEY, GRIDS_DIR

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


def train(cfg) -> None:
    from vae.registry.publish import publish_run
    from vae.training.trainer import train

    train(cfg, publisher=publish_run)


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
    # each validation's grid (8 crops over their reconstructions, full resolution) in MLflow at its step
    assert logged_image_steps(client, meta["mlflow_run_id"], GRID_KEY) == [2, 4]
    with Image.open(tmp_path / "whole" / GRIDS_DIR / "step-000000004.png") as grid:
        assert grid.size == (8 * (SIDE + 2) + 2, 2 * (SIDE + 2) + 2)
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
    expected, got = checkpoint_tensors(whole), checkpoint_tensors(resumed)
    assert expected.keys() == got.keys()
    assert any(k.startswith("model_1.safetensors:") and "running_mean" in k for k in expected)  # BatchNorm stats
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)




def validation_images(shards: Path) -> np.ndarray:
    """The 16 validation crops as the model sees them: float32 (N, 3, 32, 32) in [0, 1]."""
    return (np.load(shards.parent / "test.npy").transpose(0, 3, 1, 2) / 255).astype(np.float32)


def meta_run_id(out: Path) -> str:
    return checkpoint.read_meta(checkpoint.latest(out))["mlflow_run_id"]


def shows_what_the_flow_and_the_demo_show(out: Path, run_id: str, metrics: dict, tracking_uri: str, capsys,
                                          monkeypatch) -> None:
    """The train-vae flow's report of this registered aekl run inlines its reconstruction grid, and `vaepipe demo`
    ends with its PSNR and SSIM: both read from what the run saved, as the flow's publish task does."""
    from flows import cli
    from flows import train_vae as flow
    from vae.training.finalize import load_evaluation

    cfg = load_config(out / "config.yaml", ["--tracking.tracking_uri", tracking_uri])
    saved, details, version = flow.publish.fn(cfg, run_id)  # registered already: the same version comes back
    assert saved == metrics and int(version.version) == 1
    markdown = flow.report(cfg, run_id, saved, details, version)
    grid = markdown.split("![validation images (top) over their reconstructions](data:image/png;base64,", 1)[1]
    assert base64.b64decode(grid.split(")", 1)[0]) == (out / "plots" / "reconstructions.png").read_bytes()
    assert f"runs:/{run_id}/plots/reconstructions.png" in markdown and "no picture" not in markdown
    assert load_evaluation(out)[1]["headline"] in markdown

    monkeypatch.setattr(flow, "train_vae", lambda config: flow.outcome(run_id, saved, details, version))
    capsys.readouterr()
    assert cli.demo(cfg) == 0
    printed = capsys.readouterr().out
    assert f"final evaluation   val PSNR {metrics['val/psnr']:.2f} dB, SSIM {metrics['val/ssim']:.4f}" in printed


def test_finalize_registers_aekl_on_psnr_and_pulls_a_diffusers_folder_that_reconstructs_as_logged(
        tmp_path, photo_shards, vgg_weights, tracking_uri, capsys, monkeypatch):
    from torchvision.models import alexnet

    from vae.evaluation import EvaluateOptions, evaluate_models

    name = f"aekl-e2e-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "run"
    # the evaluation's LPIPS(alex) backbone, random, in this test's torch hub cache (no Inception: rFID absent)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(alexnet(weights=None).state_dict(), hub / "alexnet-owt-7be5be79.pth")
    with in_process(tracking_uri):
        train(config(photo_shards, out, vgg_weights, "--train.epochs", "1", "--tracking.finalize", "register",
                     "--tracking.model_name", name))
    metrics = json.loads((out / "metrics.json").read_text())
    details = json.loads((out / "evaluation.json").read_text())
    # the aekl evaluation, not the ELBO's: PSNR/SSIM, LPIPS(alex) (local, random weights here), latent statistics
    assert "val/nll_iwae" not in metrics and {"val/psnr", "val/ssim", "val/lpips"} <= metrics.keys()
    assert {f"val/latent_std/{c}" for c in range(4)} <= metrics.keys() and metrics["val/scaling_factor"] > 0
    assert ("val/rfid" in metrics) != ("val/rfid" in details["absent"])  # measured, or said why not
    assert details["champion"] == "val_psnr"
    stats = details["model_spec"]["latent_stats"]
    assert (stats["scaling_factor"], stats["shift_factor"]) == (metrics["val/scaling_factor"],
                                                                metrics["val/shift_factor"])
    with Image.open(out / "plots" / "reconstructions.png") as grid:  # 8 originals over 8 reconstructions, 32 px
        assert grid.size == (8 * (SIDE + 2) + 2, 2 * (SIDE + 2) + 2)
    assert details["picture"]["file"] == "plots/reconstructions.png"  # what reports show of an aekl run
    assert details["headline"].startswith(f"val PSNR {metrics['val/psnr']:.2f} dB, SSIM {metrics['val/ssim']:.4f}")
    client = mlflow.MlflowClient(tracking_uri)
    version = client.get_model_version_by_alias(name, "champion")
    assert int(version.version) == 1 and float(version.tags["val_psnr"]) == metrics["val/psnr"]
    assert float(version.tags["val_scaling_factor"]) == metrics["val/scaling_factor"]
    # the protocol it was scored under: in evaluation.json, on the version and as the run's params
    protocol = details["protocol"]
    assert (protocol["split"], protocol["count"], protocol["posterior"]) == ("test", 16, "mode")
    assert protocol["lpips"].startswith("alex: lpips") and protocol["fid"].startswith("absent")
    assert version.tags["eval_protocol_sha256"] == details["protocol_sha256"]
    assert json.loads(version.tags["eval_protocol"]) == protocol
    assert client.get_run(meta_run_id(out)).data.params["protocol.count"] == "16"
    # `vaepipe evaluate` of the registered version on the same shards runs the same code: same protocol, same numbers
    again = evaluate_models([f"models:/{name}@champion"], photo_shards, options=EvaluateOptions(split="test"),
                            tracking_uri=tracking_uri, track=False)
    assert again.protocol.digest() == details["protocol_sha256"]
    for key in ("psnr", "ssim", "lpips"):
        assert again.models[0]["metrics"][key] == pytest.approx(metrics[f"val/{key}"], rel=1e-5)

    shows_what_the_flow_and_the_demo_show(out, meta_run_id(out), metrics, tracking_uri, capsys, monkeypatch)

    dest = tmp_path / "pulled"
    result = run([str(BIN / "vaepipe"), "models", "pull", name, str(dest), "--format", "diffusers",
                  "--tracking-uri", tracking_uri], timeout=300)
    assert result.returncode == 0, result.stderr
    config_ = json.loads((dest / "config.json").read_text())
    assert (config_["scaling_factor"], config_["shift_factor"]) == (stats["scaling_factor"], stats["shift_factor"])
    x = validation_images(photo_shards)
    recon = np.round(reconstruct_elsewhere(dest, x, tmp_path).astype(np.float64) * 255)  # the protocol: on uint8
    mse = ((recon - np.round(x * 255)) ** 2).mean(axis=(1, 2, 3))
    psnr = float(np.mean(10 * np.log10(255**2 / mse)))  # per image, then averaged
    assert psnr == pytest.approx(metrics["val/psnr"], abs=1e-3)


def test_decoder_only_fine_tuning_through_the_trainer_keeps_the_encoders_latents_bit_equal(
        tmp_path, photo_shards, vgg_weights, tracking_uri):
    """Start from a diffusers folder with --model.train_encoder false: after two optimiser steps (every loss on,
    EMA kept) the checkpoint's encoder (and EMA encoder) encode bit-equally to the folder's; the decoder moved."""
    from vae.models.spec import build_from_spec, model_spec
    from vae.registry.diffusers import export_diffusers

    torch.manual_seed(3)
    start = build_from_spec(model_spec("aekl", (3, SIDE, SIDE), 4, channels=[8, 16, 16], layers_per_block=1,
                                       norm_groups=4, attention=False, likelihood="gaussian")).eval()
    folder = export_diffusers(start, tmp_path / "folder")
    out = tmp_path / "tuned"
    cfg = config(photo_shards, out, vgg_weights, "--train.epochs", "1", "--model.pretrained", str(folder),
                 "--model.train_encoder", "false")
    with in_process(tracking_uri):
        train(cfg)
    path = checkpoint.latest(out)
    assert path.name == "step-000000002"
    tuned, _ = load_checkpoint(path)  # the EMA weights (kept: train.ema_decay)
    raw = load_file(path / "model.safetensors")
    x = torch.from_numpy(validation_images(photo_shards))
    with torch.no_grad():
        expected = start.encode_latents(x)
        assert torch.equal(tuned.eval().encode_latents(x), expected)
        for key, value in start.state_dict().items():
            if key.startswith(("vae.encoder.", "vae.quant_conv.")):
                assert torch.equal(raw[key], value), key
        assert not torch.equal(raw["vae.decoder.conv_out.weight"], start.state_dict()["vae.decoder.conv_out.weight"])
