"""model.arch aekl: diffusers' AutoencoderKL wrapped, its config section, pretrained folders, decoder-only
fine-tuning, and the aekl objective (LPIPS, PatchGAN, adaptive weight). Tiny models, 32 px, CPU."""


import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

import pipeline
from vae.config import AeklLossSection, ConfigError, load_config, validate
from vae.models import build_model
from vae.objectives import build_objective
from vae.objectives.aekl.losses import (
    NLayerDiscriminator,
    adaptive_weight,
    build_discriminator,
    build_lpips,
    discriminator_loss,
    generator_loss,
)
from vae.training.data import build_loaders
from vae.training.trained import resolve_model

TINY = {"channels": (8, 16, 16), "layers_per_block": 1, "norm_groups": 4, "attention": False}


def tiny(shape=(3, 32, 32), latent_dim=4, **options):
    torch.manual_seed(0)
    return build_model("aekl", shape, latent_dim, **{**TINY, **options})


@pytest.mark.parametrize("shape", [(1, 32, 32), (3, 32, 48)], ids=str)
def test_spatial_latents_any_channels_and_non_square(shape):
    model = tiny(shape).eval()
    x = torch.rand(2, *shape)
    z = model.encode_latents(x)
    assert z.shape == (2, 4, shape[1] // 4, shape[2] // 4) and model.latent_size == z[0].numel()
    images = model.decode_latents(z)
    assert images.shape == x.shape and images.min() >= 0 and images.max() <= 1
    # the contract's flat view is the same latent: decode(encode(x)[0]) == decode_latents(encode_latents(x))
    torch.testing.assert_close(model.decode(model.encode(x)[0]), images)
    # the head's pixel mean of the params is diffusers' (out + 1) / 2 (up to the logit's clamp)
    out = model(x)
    torch.testing.assert_close(model.head.mean(out.params), model.decode(out.groups[0].z), atol=2e-6, rtol=0)


def test_factor_comes_from_levels_and_sides_must_divide():
    assert tiny(channels=(8, 8, 8, 8)).latent_shape == (4, 4, 4)  # f8
    with pytest.raises(ValueError, match="image sides divisible by 8, got 32x36"):
        tiny((3, 32, 36), channels=(8, 8, 8, 8))
    with pytest.raises(ConfigError, match=r"model.channels has 2 levels: give 3, 4 or 5"):
        load_config(None, ["--model.arch", "aekl", "--model.channels", "[8, 8]"])
    with pytest.raises(ConfigError, match=r"model.norm_groups 32 must divide every entry of model.channels"):
        load_config(None, ["--model.arch", "aekl", "--model.channels", "[8, 16, 16]"])


def test_loss_aekl_fields_are_refused_for_other_architectures_and_heads_checked():
    with pytest.raises(ConfigError, match=r"loss.aekl configures the aekl objective, but model.arch is 'conv'"):
        load_config(None, ["--loss.aekl.kl_weight", "1e-5"])
    with pytest.raises(ConfigError, match=r"loss.likelihood 'logistic_mixture' cannot be used"):
        load_config(None, ["--model.arch", "aekl", "--loss.likelihood", "logistic_mixture"])
    with pytest.raises(ConfigError, match=r"loss.aekl.disc_loss: Input should be 'hinge' or 'vanilla'"):
        load_config(None, ["--model.arch", "aekl", "--loss.aekl.disc_loss", "wgan"])
    cfg = load_config(None, ["--model.arch", "aekl", "--loss.aekl.recon", "l2", "--loss.aekl.disc_start", "5"])
    assert (cfg.loss.aekl.recon, cfg.loss.aekl.disc_start, cfg.loss.aekl.kl_weight) == ("l2", 5, 1e-6)


def _folder(tmp_path, **config):
    torch.manual_seed(1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, **config)
    vae.save_pretrained(tmp_path / "vae")
    return vae.eval(), tmp_path / "vae"


def test_pretrained_folder_fills_the_section_and_loads_its_weights(tmp_path):
    reference, folder = _folder(tmp_path)
    cfg = resolve_model(validate({"model": {"arch": "aekl", "pretrained": str(folder)}}))
    assert (list(cfg.model.channels), cfg.model.layers_per_block, cfg.model.norm_groups) == ([8, 16, 16], 1, 4)
    options = cfg.model.constructor_options()
    model = build_model("aekl", (3, 32, 32), cfg.model.latent_dim, **options).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.encode_latents(x), reference.encode(x * 2 - 1).latent_dist.mean)
    with pytest.raises(ConfigError, match=r"disagrees with model.latent_dim 16 \(the folder has 4\): leave"):
        resolve_model(validate({"model": {"arch": "aekl", "pretrained": str(folder), "latent_dim": 16}}))
    with pytest.raises(ConfigError, match=r"not a diffusers AutoencoderKL folder: no config.json"):
        resolve_model(validate({"model": {"arch": "aekl", "pretrained": str(tmp_path)}}))
    with pytest.raises(ValueError, match=r"in_channels=3, the model section or data asks for 1"):
        build_model("aekl", (1, 32, 32), 4, **options)
    # the resolved config, saved beside a checkpoint, still validates where the folder is gone (validation reads
    # no disk: only building the model resolves the folder)
    saved = cfg.model_dump(mode="json")
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()
    assert validate(saved).model == cfg.model


def test_decoder_only_fine_tuning_keeps_encoder_and_latents_bit_equal():
    model = tiny(train_encoder=False)
    x = torch.rand(4, 3, 32, 32)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("vae.encoder.", "vae.quant_conv."))}
    with torch.no_grad():
        before = model.eval().encode_latents(x)
    decoder = model.vae.decoder.conv_out.weight.clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # decay too must not touch them
    cfg = AeklLossSection()
    model.train()
    for step in range(3):
        generator_loss(model.autoencode(x), x, cfg, step).loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in frozen.items())
    assert not torch.equal(model.vae.decoder.conv_out.weight, decoder)
    with torch.no_grad():
        assert torch.equal(model.eval().encode_latents(x), before)


def test_lpips_with_random_weights_scores_differences():
    lpips = build_lpips(AeklLossSection(), random_weights=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert lpips(x, x).abs().max() < 1e-6
    assert (lpips(x, x.flip(-1)) > 0).all()
    assert not any(p.requires_grad for p in lpips.parameters())


def test_lpips_without_backbone_weights_is_refused_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"vgg16-397923af.pth into the torch hub cache .*--loss.aekl.lpips_"
                                                r"weights; or set --loss.aekl.perceptual_weight 0"):
        build_lpips(AeklLossSection(perceptual_weight=1.0))
    with pytest.raises(FileNotFoundError, match=r"lpips_weights .*nope.pth' does not exist"):
        build_lpips(AeklLossSection(perceptual_weight=1.0, lpips_weights=str(tmp_path / "nope.pth")))
    assert build_lpips(AeklLossSection()) is None  # off: nothing needed


def test_lpips_loads_the_backbone_from_a_local_safetensors_file(tmp_path):
    from safetensors.torch import save_file
    from torchvision.models import vgg16

    torch.manual_seed(3)
    state = {k: v.contiguous() for k, v in vgg16(weights=None).state_dict().items()}
    save_file(state, tmp_path / "vgg16.safetensors")
    lpips = build_lpips(AeklLossSection(perceptual_weight=1.0, lpips_weights=str(tmp_path / "vgg16.safetensors")))
    assert torch.equal(lpips.net.slice1[0].weight, state["features.0.weight"])
    assert torch.equal(lpips.net.slice5._modules["28"].weight, state["features.28.weight"])
    save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="is not torchvision's VGG16 state dict"):
        build_lpips(AeklLossSection(perceptual_weight=1.0, lpips_weights=str(tmp_path / "other.safetensors")))


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer():
    torch.manual_seed(0)
    w = torch.randn(3, 3, requires_grad=True)
    x = torch.randn(5, 3)
    nll, g = (x @ w).abs().sum(), -(x @ w).pow(2).mean()
    gn, gg = torch.autograd.grad(nll, w, retain_graph=True)[0], torch.autograd.grad(g, w, retain_graph=True)[0]
    torch.testing.assert_close(adaptive_weight(nll, g, w), gn.norm() / (gg.norm() + 1e-4))


def test_generator_and_discriminator_losses_switch_on_at_disc_start():
    model = tiny()
    disc = build_discriminator(AeklLossSection(disc_weight=0.5), 3)
    assert isinstance(disc, NLayerDiscriminator) and build_discriminator(AeklLossSection(), 3) is None
    cfg = AeklLossSection(disc_weight=0.5, disc_start=1, perceptual_weight=1.0)
    lpips = build_lpips(cfg, random_weights=True)
    x = torch.rand(2, 3, 32, 32)
    out = model.autoencode(x)
    early = generator_loss(out, x, cfg, 0, lpips, disc, model.last_layer)
    late = generator_loss(out, x, cfg, 1, lpips, disc, model.last_layer)
    assert early.g_loss == 0 and early.d_weight == 0 and late.d_weight > 0
    torch.testing.assert_close(late.loss, early.loss + late.d_weight * late.g_loss)
    assert late.perceptual > 0 and late.kl > 0
    late.loss.backward()
    assert model.last_layer.grad is not None and disc.main[0].weight.grad is not None
    for kind in ("hinge", "vanilla"):
        c = AeklLossSection(disc_weight=0.5, disc_start=1, disc_loss=kind)
        assert not discriminator_loss(disc, x, out.recon, c, 0).active
        d = discriminator_loss(disc, x, out.recon, c, 1)
        assert d.active and d.loss > 0
        d.loss.backward()
    assert generator_loss(out, x, AeklLossSection(recon="l2"), 0).recon == ((x * 2 - 1) - out.recon).pow(2).mean()


# ---- evaluation -------------------------------------------------------------------------------------------------

def test_scaling_and_shift_factor_from_known_latents():
    from vae.objectives.aekl.evaluation import latent_moments, latent_stats

    torch.manual_seed(0)
    means, stds = torch.tensor([0.5, -1.0, 2.0, 0.0]), torch.tensor([2.0, 0.5, 1.0, 4.0])
    z = torch.randn(400, 4, 8, 8) * stds.view(1, 4, 1, 1) + means.view(1, 4, 1, 1)
    moments = sum(latent_moments(chunk) for chunk in z.split(64))  # streamed in batches, as over ranks
    stats = latent_stats(moments)
    torch.testing.assert_close(torch.tensor(stats.mean), means, atol=0.05, rtol=0)
    torch.testing.assert_close(torch.tensor(stats.std), stds, atol=0.05, rtol=0.02)
    # over all channels: the mixture's mean and 1 / its std
    torch.testing.assert_close(stats.shift_factor, z.double().mean().item(), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(stats.scaling_factor, 1 / z.double().std(correction=0).item(), atol=0, rtol=1e-9)
    with pytest.raises(ValueError, match="zero variance"):
        latent_stats(latent_moments(torch.ones(2, 4, 2, 2)))


class OneProcess:
    """What the final evaluation asks of Accelerate's Accelerator, for one process on the CPU."""

    device = torch.device("cpu")
    num_processes = 1
    process_index = 0
    is_main_process = True


def final_evaluation(tmp_path, images: np.ndarray, model):
    """AeklObjective.final_evaluation as training ends with it (vae/training/finalize.py): `model` over the
    validation loader
    the trainer builds, in batches of 4, from shards of `images` (N, H, W[, C]) uint8. (the result, the config)."""
    np.save(tmp_path / "images.npy", images)
    files = {"train": str(tmp_path / "images.npy"), "test": str(tmp_path / "images.npy")}
    pipeline.ingest("arrays", {"files": files}, tmp_path / "shards", 4, 2, progress=False)
    cfg = load_config(None, ["--model.arch", "aekl", "--model.channels", "[8, 16, 16]", "--model.norm_groups", "4",
                             "--ingest.shard_dir", str(tmp_path / "shards"), "--train.batch_size", "4"])
    _, val_loader = build_loaders(cfg, 0, 1, device="cpu")
    return build_objective(cfg).final_evaluation(OneProcess(), model, val_loader), cfg


def test_evaluation_reports_psnr_ssim_latents_and_absent_weights(tmp_path, monkeypatch):
    from PIL import Image
    from torchmetrics.functional.image import peak_signal_noise_ratio

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no LPIPS or Inception weights here
    model = tiny((3, 32, 48))
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 48, 3), dtype=np.uint8)
    result, cfg = final_evaluation(tmp_path, images, model)
    metrics = result.metrics
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        recon = model.decode_latents(model.encode_latents(x))
    recon8 = (recon * 255).round()  # the protocol's PSNR: per image on uint8, then averaged
    psnr = peak_signal_noise_ratio(recon8, x * 255, data_range=255.0, reduction="none", dim=(1, 2, 3)).mean()
    assert metrics["val/psnr"] == pytest.approx(float(psnr), rel=1e-6)
    protocol = result.details["protocol"]
    assert (protocol["split"], protocol["count"], protocol["posterior"]) == ("test", 6, "mode")
    assert protocol["lpips"].startswith("absent") and protocol["fid"].startswith("absent")
    assert result.protocol_tags["eval_protocol_sha256"] == result.details["protocol_sha256"]
    assert 0 < metrics["val/ssim"] < 1 and "val/lpips" not in metrics and "val/rfid" not in metrics
    absent = result.details["absent"]
    assert set(absent) == {"val/lpips", "val/rfid"} and "torch hub cache" in absent["val/rfid"]
    assert [k for k in metrics if k.startswith("val/latent_std/")] == [f"val/latent_std/{c}" for c in range(4)]
    assert metrics["val/scaling_factor"] > 0 and result.nonfinite == {}
    assert result.latent_stats["scaling_factor"] == metrics["val/scaling_factor"]  # what the export writes
    build_objective(cfg).draw(model, x, None, result, tmp_path / "plots")
    grid = Image.open(tmp_path / "plots" / "reconstructions.png")
    assert grid.size == (6 * 48 + 7 * 2, 2 * 32 + 3 * 2)  # full resolution: originals over reconstructions


def test_rfid_runs_when_inception_weights_are_in_the_torch_hub_cache(tmp_path, monkeypatch):
    """Stand-in Inception weights in torch-fidelity's file (tests/support/inception.py): rFID is measured, on grey
    images too (repeated to RGB), and the protocol names the extractor and its weights."""
    from support.inception import random_inception_file

    from vae.objectives.aekl.evaluation import INCEPTION_FILE

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    random_inception_file(tmp_path / "hub" / "checkpoints" / INCEPTION_FILE)
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32), dtype=np.uint8)
    result, _ = final_evaluation(tmp_path, images, tiny((1, 32, 32)))
    assert result.metrics["val/rfid"] > 1e-3 and "val/rfid" not in result.details["absent"]
    assert INCEPTION_FILE in result.details["protocol"]["fid"]
