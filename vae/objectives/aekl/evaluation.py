"""Evaluation of an aekl model on the validation split at full resolution, under fixed metric names.

Metrics (vae/training/finalize.py logs them like the ELBO family):
- `val/psnr` (dB) and `val/ssim`: per image (torchmetrics, data range 1), averaged over images;
- `val/lpips` (VGG) and `val/rfid` (Inception, torch-fidelity's FID weights): only when their weights are on
  this machine; otherwise they are left out of the metrics and `absent` says why (never a made-up number);
- `val/latent_mean/{c}`, `val/latent_std/{c}` per latent channel, over every position of the posterior mean of
  every validation image, and from all channels together `val/shift_factor` (the mean) and
  `val/scaling_factor` (1 / std): what a diffusion model multiplies latents by, `(z - shift) * scale`, to
  train on unit-variance latents (SD's 0.18215 was computed this way); the export writes them into config.json.

As in vae/objectives/elbo/evaluation.py the per-image figures are running float64 sums (`aekl_sums`), so ranks can
all-reduce one
tensor and `aekl_metrics` turns the totals into the figures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple
from unittest import mock

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchvision.utils import make_grid, save_image

from vae.objectives.inputs import to_unit

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID Inception (the TF port)
METRICS = ("val/psnr", "val/ssim", "val/lpips", "val/rfid", "val/shift_factor", "val/scaling_factor")


class LatentStats(NamedTuple):
    mean: list[float]  # per latent channel
    std: list[float]
    shift_factor: float  # mean over all channels and positions
    scaling_factor: float  # 1 / std over all channels and positions


def latent_moments(z: torch.Tensor) -> torch.Tensor:
    """Latents (B, c, h, w) -> float64 (3, c): per channel the count, sum and sum of squares (all-reducible)."""
    z = z.double().transpose(0, 1).flatten(1)  # (c, B*h*w)
    return torch.stack([torch.full((len(z),), z.shape[1], dtype=torch.float64, device=z.device),
                        z.sum(1), z.pow(2).sum(1)])


def latent_stats(moments: torch.Tensor) -> LatentStats:
    """The (3, c) moments summed over batches (and ranks) -> per-channel mean and std and the two factors."""
    n, s, ss = moments.double().cpu()
    mean = s / n
    var = (ss / n - mean.pow(2)).clamp_min(0)
    total_mean = s.sum() / n.sum()
    total_var = (ss.sum() / n.sum() - total_mean.pow(2)).clamp_min(0)
    if total_var == 0:
        raise ValueError("the latents have zero variance over the validation set: no scaling factor exists")
    return LatentStats(mean.tolist(), var.sqrt().tolist(), float(total_mean), float(total_var.rsqrt()))


@torch.no_grad()
def aekl_sums(model: torch.nn.Module, batches: Iterable[torch.Tensor], device: torch.device | str,
              lpips: torch.nn.Module | None = None,
              prepare: Callable[[torch.Tensor], torch.Tensor] = to_unit) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over the batches: (psnr, ssim, lpips, count) float64 and the latent moments (3, latent channels).

    Reconstructions decode the posterior mean (deterministic), at the images' full resolution.
    """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    moments = None
    for images in batches:
        x = prepare(images.to(device, non_blocking=True))
        z = model.encode_latents(x)
        recon = model.decode_latents(z)
        psnr = peak_signal_noise_ratio(recon, x, data_range=1.0, reduction="none", dim=(1, 2, 3))
        ssim = structural_similarity_index_measure(recon, x, data_range=1.0, reduction="none")
        lp = lpips(x * 2 - 1, recon * 2 - 1).flatten() if lpips is not None else torch.zeros_like(psnr)
        sums += torch.stack([psnr.double().sum(), ssim.double().sum(), lp.double().sum(),
                             torch.tensor(float(len(x)), dtype=torch.float64, device=device)])
        m = latent_moments(z)
        moments = m if moments is None else moments + m
    if moments is None:
        raise ValueError("evaluation saw no images; check data.val_split")
    return sums, moments


def aekl_metrics(sums: torch.Tensor, moments: torch.Tensor, lpips_present: bool,
                 rfid: float | None = None) -> tuple[dict[str, float], LatentStats]:
    """Totals -> the fixed `val/*` metrics (LPIPS and rFID only when measured) and the latent statistics."""
    psnr, ssim, lp, n = sums.tolist()
    stats = latent_stats(moments)
    metrics = {"val/psnr": psnr / n, "val/ssim": ssim / n}
    if lpips_present:
        metrics["val/lpips"] = lp / n
    if rfid is not None:
        metrics["val/rfid"] = rfid
    metrics["val/shift_factor"] = stats.shift_factor
    metrics["val/scaling_factor"] = stats.scaling_factor
    for c, (m, s) in enumerate(zip(stats.mean, stats.std, strict=True)):
        metrics[f"val/latent_mean/{c}"] = m
        metrics[f"val/latent_std/{c}"] = s
    return metrics, stats


def inception_weights_path(path: str | Path | None) -> Path | None:
    """The FID Inception weights: the given file, else torch-fidelity's file in the torch hub cache, else None."""
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"Inception weights {str(path)!r} do not exist: give torch-fidelity's "
                                    f"{INCEPTION_FILE} (or a .safetensors of it)")
        return Path(path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    return cached if cached.is_file() else None


def build_fid(weights: Path):
    """torchmetrics' FID on torch-fidelity's Inception, its weights read without pickle.

    torch-fidelity reads a weights file with torch.load(weights_only=False) (pickle: a planted file would run
    code) and otherwise downloads; it offers no other way in, so its loader is replaced, for this construction
    only, by one returning the state dict we read as safetensors or with weights_only=True.
    """
    import torch_fidelity.feature_extractor_inceptionv3 as inception
    from torchmetrics.image.fid import FrechetInceptionDistance

    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(weights)
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    with mock.patch.object(inception, "load_state_dict_from_url", lambda *args, **kwargs: state):
        return FrechetInceptionDistance(feature=2048, normalize=True)


@torch.no_grad()
def rfid(model: torch.nn.Module, batches: Iterable[torch.Tensor], device: torch.device | str, weights: Path,
         prepare: Callable[[torch.Tensor], torch.Tensor] = to_unit) -> float:
    """Reconstruction FID: validation images against their reconstructions (grey images repeated to RGB)."""
    fid = build_fid(weights).to(device)
    model.eval()
    for images in batches:
        x = prepare(images.to(device, non_blocking=True))
        recon = model.decode_latents(model.encode_latents(x))
        rgb = (lambda t: t.expand(-1, 3, -1, -1)) if x.shape[1] == 1 else (lambda t: t)
        fid.update(rgb(x), real=True)
        fid.update(rgb(recon), real=False)
    return float(fid.compute())


@torch.no_grad()
def reconstruction_grid(model: torch.nn.Module, x: torch.Tensor, path: str | Path, n: int = 8) -> Path:
    """Originals (top row) over their reconstructions (bottom row) at full resolution, x in [0, 1]."""
    model.eval()
    x = x[:n]
    recon = model.decode_latents(model.encode_latents(x)).to(x.dtype)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(torch.cat([x, recon]), nrow=len(x), padding=2, pad_value=0.5), path)
    return path
