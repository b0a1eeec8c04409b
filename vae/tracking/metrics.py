"""The fixed, slash-separated metric names (ARCHITECTURE.md): anything logged goes through one of these."""

from __future__ import annotations

import math

# The fixed, slash-separated metric names (DESIGN.md). Anything logged goes through one of these.
METRICS = (
    "train/loss", "train/elbo", "train/recon", "train/kl", "train/lr", "train/grad_norm", "train/samples_per_s",
    "train/skipped_steps", "train/skipped_shards",
    "val/elbo", "val/recon", "val/kl", "val/nll_iwae", "val/bpd", "val/active_units", "val/recon_mse",
    "val/skipped_shards",
    # the aekl objective (vae/objectives/aekl/objective.py) and its per-epoch validation
    "train/perceptual", "train/g_loss", "train/d_weight", "train/disc_loss", "train/grad_norm_discriminator",
    "val/psnr", "val/ssim",
    # the aekl final evaluation (vae/objectives/aekl/evaluation.py)
    "val/lpips", "val/rfid", "val/shift_factor", "val/scaling_factor",
)
# Fixed families with one member per latent channel: val/latent_mean/0, val/latent_mean/1, ... (aekl).
PER_CHANNEL = ("val/latent_mean/", "val/latent_std/")
# The fixed keys of images logged per step (MLflow's image charts): the objective's grid at each validation.
IMAGES = ("val/reconstructions",)



def checked(metrics: dict[str, float]) -> dict[str, float]:
    """`metrics` as floats; an unknown name is a programming error, caught here."""
    unknown = {k for k in set(metrics) - set(METRICS)
               if not any(k.startswith(f) and k.removeprefix(f).isdigit() for f in PER_CHANNEL)}
    if unknown:
        raise ValueError(f"metric names {sorted(unknown)} are not among the fixed names {METRICS} "
                         f"nor {', '.join(f + '<channel>' for f in PER_CHANNEL)}")
    return {k: float(v) for k, v in metrics.items()}


def checked_image(key: str) -> str:
    """`key` when it is a fixed image key; an unknown one is a programming error, caught here."""
    if key not in IMAGES:
        raise ValueError(f"image key {key!r} is not among the fixed keys {IMAGES}")
    return key



def finite(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics MLflow gets: a NaN or infinite one is left out (its reason goes to a tag instead)."""
    return {k: v for k, v in metrics.items() if math.isfinite(v)}
