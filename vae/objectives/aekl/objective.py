"""The aekl objective: diffusers' AutoencoderKL on LDM's loss with a PatchGAN discriminator, judged by PSNR, SSIM,
LPIPS and rFID, and the latent statistics a diffusion model needs (scaling and shift factors)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

import pipeline
from vae.config import RunConfig
from vae.objectives.aekl.evaluation import aekl_sums, measure, protocol_for, reconstruction_grid, scorers
from vae.objectives.aekl.losses import (
    build_discriminator,
    build_lpips,
    disc_factor,
    discriminator_loss,
    generator_loss,
)
from vae.objectives.aekl.protocol import DIGEST_TAG, PROTOCOL_TAG
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
        return sums[[0, 1, 3]]  # psnr, ssim, count; LPIPS, rFID and the latent statistics are the final evaluation's

    def validation_metrics(self, sums: torch.Tensor) -> dict[str, float]:
        psnr, ssim, n = sums.tolist()
        return {"val/psnr": psnr / n, "val/ssim": ssim / n}

    def summary(self, val: dict[str, float]) -> str:
        return f"val PSNR {val['val/psnr']:.2f} dB, SSIM {val['val/ssim']:.4f}"

    def validation_grid(self, model: nn.Module, x: torch.Tensor, path: Path) -> Path:
        pairs = max(1, GRID_PIXELS // (2 * x.shape[-2] * x.shape[-1]))  # full resolution, bounded in pixels
        return reconstruction_grid(unwrap(model), x, path, n=pairs)

    def final_evaluation(self, accelerator, model: nn.Module, val_loader) -> FinalEvaluation:
        """The evaluation `vaepipe evaluate` runs (aekl/evaluation.py `measure`), under the protocol of the whole
        validation split, posterior mode, LPIPS on AlexNet (the evaluation's network, whatever the loss trains
        with) and rFID, each only with its weights on this machine (a metric without them is `absent`); the
        per-channel latent statistics and from them the scaling and shift factors. The protocol goes into
        evaluation.json and the registered version's tags."""
        model = unwrap(model).eval()
        tools = scorers("alex", images=val_loader.num_samples)
        protocol = protocol_for(val_loader.index, pipeline.index_sha256(val_loader.location), val_loader.split,
                                val_loader.num_samples, val_loader.crop_size, "mode", None, tools)
        metrics, stats, _ = measure(model, (b.images for b in val_loader), accelerator.device, tools, protocol,
                                    prepare=lambda images: to_input(images, self.cfg),  # what training sees
                                    reduce=lambda t: reduced(accelerator, t))
        nonfinite = {k: f"{k} is {v}" for k, v in metrics.items() if not np.isfinite(v)}
        headline = (f"val PSNR {metrics['val/psnr']:.2f} dB, SSIM {metrics['val/ssim']:.4f}, scaling_factor "
                    f"{stats.scaling_factor:.5f}, shift_factor {stats.shift_factor:.5f}")
        details = {"absent": tools.absent, "latents": stats._asdict(), "protocol": protocol.model_dump(mode="json"),
                   "protocol_sha256": protocol.digest()}
        return FinalEvaluation(metrics, details, headline, nonfinite, latent_stats=stats._asdict(),
                               protocol_tags={DIGEST_TAG: protocol.digest(), PROTOCOL_TAG: protocol.canonical()})

    def draw(self, model: nn.Module, x: torch.Tensor, labels: np.ndarray | None, result: FinalEvaluation,
             out: Path) -> None:
        reconstruction_grid(model, x, out / self.picture.file, n=self.grid_images)  # full resolution

    @classmethod
    def version_tags(cls, metrics: dict[str, float]) -> dict[str, str]:
        return {k.replace("/", "_"): repr(float(metrics[k]))  # val_psnr is the registry's own tag
                for k in ("val/ssim", "val/lpips", "val/scaling_factor", "val/shift_factor") if k in metrics}
