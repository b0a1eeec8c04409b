"""The aekl objective: diffusers' AutoencoderKL on LDM's loss with a PatchGAN discriminator, judged by PSNR, SSIM,
LPIPS and rFID, and the latent statistics a diffusion model needs (scaling and shift factors)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vae.config import RunConfig
from vae.objectives.aekl.evaluation import (
    INCEPTION_FILE,
    aekl_metrics,
    aekl_sums,
    inception_weights_path,
    reconstruction_grid,
    rfid,
)
from vae.objectives.aekl.losses import (
    build_discriminator,
    build_lpips,
    disc_factor,
    discriminator_loss,
    generator_loss,
    vgg16_weights_path,
)
from vae.objectives.base import (
    PSNR,
    Backward,
    FinalEvaluation,
    Objective,
    Picture,
    frozen,
    reduced,
    register_objective,
    unwrap,
)
from vae.objectives.inputs import to_input

# A validation grid holds at most this many pixels (originals and reconstructions, full resolution): 8 pairs at
# 512 px; fewer pairs above. Each is a PNG sent to MLflow in one short request (vae/tracking/journal.py).
GRID_PIXELS = 4 << 20


@register_objective("aekl", archs=("aekl",))
class AeklObjective(Objective):
    """diffusers' AutoencoderKL on LDM's loss (aekl/losses.py): per micro-batch the autoencoder's loss (pixel
    L1/L2 + perceptual + kl_weight * KL + the adaptive-weighted GAN term from loss.aekl.disc_start), then the
    PatchGAN discriminator's on the detached reconstructions, with its own optimiser (loss.aekl.disc_lr)."""

    metrics = ("loss", "recon", "perceptual", "kl", "g_loss", "d_weight", "disc_loss")
    champion = PSNR
    picture = Picture("reconstructions.png", "validation images (top) over their reconstructions")
    grid_images = 8

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        # frozen and not trained: neither prepared, checkpointed nor averaged; its weights come from a local file
        self.lpips = build_lpips(cfg.loss.aekl)

    def models(self, model: nn.Module) -> dict[str, nn.Module]:
        disc = build_discriminator(self.cfg.loss.aekl, model.image_shape[0])
        return {"model": model} if disc is None else {"model": model, "discriminator": disc}

    def lr_scale(self, name: str) -> float:
        disc_lr = self.cfg.loss.aekl.disc_lr
        return disc_lr / self.cfg.optim.lr if name == "discriminator" and disc_lr is not None else 1.0

    def step(self, models: dict[str, nn.Module], x: torch.Tensor, step: int, backward: Backward) -> torch.Tensor:
        cfg, model, disc = self.cfg.loss.aekl, models["model"], models.get("discriminator")
        if self.lpips is not None:
            self.lpips.to(x.device)  # a no-op after the first step
        out = model(x, autoencode=True)  # through DDP and autocast
        zero = torch.zeros((), device=x.device)
        inner = getattr(disc, "module", disc)  # the generator's term: past DDP, parameters frozen
        with frozen(inner) if inner is not None else contextlib.nullcontext():
            terms = generator_loss(out, x, cfg, step, self.lpips, inner, last_layer=unwrap(model).last_layer)
            backward(terms.loss)
        disc_loss = zero
        if disc is not None and disc_factor(cfg, step) > 0:  # before disc_start the discriminator is not run at all
            d = discriminator_loss(disc, x, out.recon.detach(), cfg, step)
            backward(d.loss)
            disc_loss = d.loss.detach()
        parts = (terms.loss.detach(), terms.recon, terms.perceptual, terms.kl, terms.g_loss, terms.d_weight, disc_loss)
        return torch.stack([p.float() for p in parts]) * len(x)  # batch means -> sums over the batch's images

    def validation_sums(self, model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
        sums, _ = aekl_sums(unwrap(model), batches, device, prepare=lambda images: to_input(images, self.cfg))
        return sums[[0, 1, 3]]  # psnr, ssim, count; LPIPS and the latent statistics are the final evaluation's

    def validation_metrics(self, sums: torch.Tensor) -> dict[str, float]:
        psnr, ssim, n = sums.tolist()
        return {"val/psnr": psnr / n, "val/ssim": ssim / n}

    def summary(self, val: dict[str, float]) -> str:
        return f"val PSNR {val['val/psnr']:.2f} dB, SSIM {val['val/ssim']:.4f}"

    def validation_grid(self, model: nn.Module, x: torch.Tensor, path: Path) -> Path:
        pairs = max(1, GRID_PIXELS // (2 * x.shape[-2] * x.shape[-1]))  # full resolution, bounded in pixels
        return reconstruction_grid(unwrap(model), x, path, n=pairs)

    def final_evaluation(self, accelerator, model: nn.Module, val_loader) -> FinalEvaluation:
        """PSNR and SSIM at full resolution, LPIPS with the objective's LPIPS (or local VGG weights), rFID when
        torch-fidelity's Inception weights are in the torch hub cache; the per-channel latent statistics and
        from them the scaling and shift factors (aekl/evaluation.py). A metric without weights is `absent`."""
        model = unwrap(model).eval()
        device = accelerator.device
        lpips = self.lpips if self.lpips is not None else self.evaluation_lpips()
        if lpips is not None:
            lpips.to(device)

        def batches():
            return (b.images for b in val_loader)

        prepare = lambda images: to_input(images, self.cfg)  # noqa: E731 - validation sees what training sees
        sums, moments = aekl_sums(model, batches(), device, lpips, prepare)
        sums, moments = reduced(accelerator, sums), reduced(accelerator, moments)
        absent = {}
        if lpips is None:
            absent["val/lpips"] = ("no LPIPS VGG weights on this machine (loss.aekl.lpips_weights or the torch hub "
                                   "cache)")
        weights = inception_weights_path(None)
        # torchmetrics' FID all-gathers its feature statistics across ranks in compute()
        score = rfid(model, batches(), device, weights, prepare) if weights is not None else None
        if weights is None:
            absent["val/rfid"] = f"no Inception weights ({INCEPTION_FILE} in the torch hub cache)"
        metrics, stats = aekl_metrics(sums, moments, lpips is not None, score)
        nonfinite = {k: f"{k} is {v}" for k, v in metrics.items() if not np.isfinite(v)}
        headline = (f"val PSNR {metrics['val/psnr']:.2f} dB, SSIM {metrics['val/ssim']:.4f}, scaling_factor "
                    f"{stats.scaling_factor:.5f}, shift_factor {stats.shift_factor:.5f}")
        return FinalEvaluation(metrics, {"absent": absent, "latents": stats._asdict()}, headline, nonfinite,
                               latent_stats=stats._asdict())

    def evaluation_lpips(self) -> nn.Module | None:
        """LPIPS for the evaluation when training ran without it: only with VGG weights on this machine."""
        section = self.cfg.loss.aekl.model_copy(update={"perceptual_weight": 1.0})
        try:
            vgg16_weights_path(section)
        except FileNotFoundError:
            return None  # reported absent, never faked
        return build_lpips(section)

    def draw(self, model: nn.Module, x: torch.Tensor, labels: np.ndarray | None, result: FinalEvaluation,
             out: Path) -> None:
        reconstruction_grid(model, x, out / self.picture.file, n=self.grid_images)  # full resolution

    @classmethod
    def version_tags(cls, metrics: dict[str, float]) -> dict[str, str]:
        return {k.replace("/", "_"): repr(float(metrics[k]))  # val_psnr is the registry's own tag
                for k in ("val/ssim", "val/lpips", "val/scaling_factor", "val/shift_factor") if k in metrics}
