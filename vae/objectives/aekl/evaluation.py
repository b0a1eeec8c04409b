"""Evaluation of an aekl model under an `EvaluationProtocol` (protocol.py), under fixed metric names: the one code path
the end of training (objective.py `final_evaluation`) and `vaepipe evaluate` (vae/evaluation) both run.

Metrics (vae/training/finalize.py logs them like the ELBO family):
- `val/psnr` (dB): per image on uint8 (image and reconstruction both rounded to 0..255), averaged over images;
  `val/ssim`: torchmetrics' SSIM on those uint8 images / 255, per image, averaged;
- `val/lpips` (AlexNet by default, `Scorers`) and `val/rfid` (Inception, torch-fidelity's FID weights): only when
  their weights are on this machine; otherwise they are left out of the metrics and `absent` says why (never a
  made-up number);
- `val/latent_mean/{c}`, `val/latent_std/{c}` per latent channel, over every position of the posterior mean of
  every image, and from all channels together `val/shift_factor` (the mean) and `val/scaling_factor` (1 / std):
  what a diffusion model multiplies latents by, `(z - shift) * scale`, to train on unit-variance latents (SD's
  0.18215 was computed this way); the export writes them into config.json.

The reconstruction decodes the posterior mode (its mean) or one seeded sample of it, as the protocol says. As in
vae/objectives/elbo/evaluation.py the per-image figures are running float64 sums (`aekl_sums`), so ranks can
all-reduce one tensor and `aekl_metrics` turns the totals into the figures; rFID's statistics are torchmetrics'
own states (all-gathered in its `compute`), the real images' half optionally cached (fid.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from importlib.metadata import version
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchvision.utils import make_grid, save_image

from vae.objectives.aekl.fid import (
    INCEPTION_FILE,
    build_fid,
    fid_description,
    file_sha256,
    inception_weights_path,
    load_reference,
    save_reference,
)
from vae.objectives.aekl.losses import BACKBONES, backbone_weights_path, load_lpips
from vae.objectives.aekl.protocol import EvaluationProtocol
from vae.objectives.inputs import to_unit

METRICS = ("val/psnr", "val/ssim", "val/lpips", "val/rfid", "val/shift_factor", "val/scaling_factor")
__all__ = ["INCEPTION_FILE", "METRICS", "Scorers", "aekl_metrics", "aekl_sums", "measure", "scorers"]


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


def quantised(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> float32 holding their uint8 values 0..255 (rounded, clamped): what PSNR is taken on."""
    return images.float().mul(255).round_().clamp_(0, 255)


def _rgb(images: torch.Tensor) -> torch.Tensor:
    """Grey images repeated to RGB (LPIPS and Inception take three channels)."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


@torch.no_grad()
def aekl_sums(model: torch.nn.Module, batches: Iterable[torch.Tensor], device: torch.device | str,
              lpips: torch.nn.Module | None = None, prepare: Callable[[torch.Tensor], torch.Tensor] = to_unit, *,
              posterior: str = "mode", seed: int | None = None, fid: Any = None,
              fid_reals: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over the batches: (psnr, ssim, lpips, count) float64 and the latent moments (3, latent channels).

    Each image is reconstructed once, at full resolution, from the posterior mean (`posterior` "mode") or one draw
    of it from a generator seeded with `seed` ("sample"); `fid` (torchmetrics' FID), when given, is updated with
    the reconstructions, and with the images themselves while `fid_reals` (False: its real statistics are cached).
    """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    moments, generator = None, None
    for images in batches:
        x = prepare(images.to(device, non_blocking=True))
        q = model.posterior(x)
        z = q.mu
        if posterior == "sample":
            if generator is None:
                generator = torch.Generator(device=q.mu.device).manual_seed(seed or 0)
            noise = torch.randn(q.mu.shape, generator=generator, device=q.mu.device, dtype=q.mu.dtype)
            z = q.mu + (0.5 * q.logvar).exp() * noise
        x8, r8 = quantised(x), quantised(model.decode_latents(z))  # (B, C, H, W) 0..255
        psnr = peak_signal_noise_ratio(r8, x8, data_range=255.0, reduction="none", dim=(1, 2, 3))
        real, recon = x8 / 255, r8 / 255
        ssim = structural_similarity_index_measure(recon, real, data_range=1.0, reduction="none")
        lp = (lpips(_rgb(real) * 2 - 1, _rgb(recon) * 2 - 1).flatten() if lpips is not None
              else torch.zeros_like(psnr))
        if fid is not None:
            if fid_reals:
                fid.update(_rgb(real), real=True)
            fid.update(_rgb(recon), real=False)
        sums += torch.stack([psnr.double().sum(), ssim.double().sum(), lp.double().sum(),
                             torch.tensor(float(len(x)), dtype=torch.float64, device=device)])
        m = latent_moments(q.mu)
        moments = m if moments is None else moments + m
    if moments is None:
        raise ValueError("evaluation saw no images; check the split (data.val_split, --split)")
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


class Scorers(NamedTuple):
    """The metrics that need weights from disk, as a protocol asks for them: each None when left out."""

    lpips: torch.nn.Module | None
    fid: Any  # torchmetrics' FrechetInceptionDistance, or None
    lpips_said: str  # the protocol's `lpips` field
    fid_said: str  # the protocol's `fid` field
    absent: dict[str, str]  # metric -> why it is left out (evaluation.json)


def _lpips_scorer(net: str, weights: str | Path | None) -> tuple[torch.nn.Module | None, str, str | None]:
    if net == "none":
        return None, "none: not asked", "LPIPS was not asked for (--lpips none)"
    file = BACKBONES[net]
    if weights is None and not (Path(torch.hub.get_dir()) / "checkpoints" / file).is_file():
        return None, f"absent: no torchvision {file} on the machine", (
            f"no LPIPS {net} backbone weights on this machine: put {file} into the torch hub cache "
            f"({Path(torch.hub.get_dir()) / 'checkpoints'}) or pass its path (--lpips-weights)")
    path = backbone_weights_path(net, weights, "--lpips-weights")  # a given path that does not exist: refused
    said = (f"{net}: lpips {version('lpips')} linear heads v0.1, torchvision backbone {path.name} sha256 "
            f"{file_sha256(path)[:16]}")
    return load_lpips(net, path), said, None


def scorers(lpips_net: str = "alex", lpips_weights: str | Path | None = None,
            inception_weights: str | Path | None = None, images: int = 2) -> Scorers:
    """LPIPS on `lpips_net` ("alex", "vgg" or "none") and FID, from the given weights or the torch hub cache; each
    is left out, with the reason, when its weights are not on this machine (nothing is downloaded), FID also below
    two images (its covariance needs two)."""
    lpips, lpips_said, lpips_absent = _lpips_scorer(lpips_net, lpips_weights)
    absent = {"val/lpips": lpips_absent} if lpips_absent else {}
    weights = inception_weights_path(inception_weights)
    if weights is None:
        fid_said = f"absent: no torch-fidelity {INCEPTION_FILE} on the machine"
        absent["val/rfid"] = f"no Inception weights ({INCEPTION_FILE} in the torch hub cache)"
    elif images < 2:
        fid_said, weights = "absent: fewer than 2 images", None
        absent["val/rfid"] = "FID needs at least 2 images (a covariance)"
    else:
        fid_said = fid_description(weights)
    return Scorers(lpips, None if weights is None else build_fid(weights), lpips_said, fid_said, absent)


def measure(model: torch.nn.Module, batches: Iterable[torch.Tensor], device: torch.device | str, tools: Scorers,
            protocol: EvaluationProtocol, prepare: Callable[[torch.Tensor], torch.Tensor] = to_unit,
            reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
            reference: Path | None = None) -> tuple[dict[str, float], LatentStats, bool]:
    """The evaluation under `protocol`: `model` over `batches` (uint8), the sums reduced over ranks by `reduce`,
    rFID's real statistics read from (or, computed, written to) `reference` when given. Returns the metrics, the
    latent statistics, and whether the real statistics came from the cache."""
    fid = tools.fid
    cached = False
    if fid is not None:
        fid.reset()  # one Scorers serves several models; the real half comes back from the cache
        fid.to(device)
        cached = reference is not None and load_reference(fid, reference)
    if tools.lpips is not None:
        tools.lpips.to(device)
    sums, moments = aekl_sums(model, batches, device, tools.lpips, prepare, posterior=protocol.posterior,
                              seed=protocol.seed, fid=fid, fid_reals=not cached)
    sums, moments = reduce(sums), reduce(moments)
    score = None
    if fid is not None:
        score = float(fid.compute())  # torchmetrics all-gathers its feature statistics across ranks here
        if reference is not None and not cached:
            save_reference(fid, reference, reference_key(protocol))
    metrics, stats = aekl_metrics(sums, moments, tools.lpips is not None, score)
    return metrics, stats, cached


def protocol_for(index: Any, index_sha256: str, split: str, count: int, crop_size: tuple[int, int] | None,
                 posterior: str, seed: int | None, tools: Scorers) -> EvaluationProtocol:
    """The protocol of an evaluation of the first `count` images of `split` of the shard directory whose index is
    `index` (pipeline's ShardIndex; its sha256 `index_sha256`), centre-cropped to `crop_size` when given."""
    h, w, c = index.image_shape
    return EvaluationProtocol(
        split=split, count=count, resolution=tuple(crop_size or (h, w)), channels=c,
        ingest_transform=f"{index.source['name']} images conformed at ingest to {h}x{w}x{c} uint8 (index.json "
                         "records the shape, not the size rule)",
        crop=f"centre {crop_size[0]}x{crop_size[1]}" if crop_size else "none: whole image",
        posterior=posterior, seed=seed if posterior == "sample" else None, lpips=tools.lpips_said,
        fid=tools.fid_said, shard_index_sha256=index_sha256)


def reference_key(protocol: EvaluationProtocol) -> dict:
    """What the real images' Inception statistics depend on: the data, the images chosen, and the extractor."""
    fields = ("shard_index_sha256", "split", "count", "resolution", "channels", "crop", "fid")
    return {k: v for k, v in protocol.model_dump(mode="json").items() if k in fields}


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
