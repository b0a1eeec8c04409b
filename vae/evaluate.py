"""Validation figures, as functions of a model and batches of images. Nats per image unless stated.

- `evaluation_sums` / `to_metrics`: the cheap per-epoch figures (ELBO, its parts, reconstruction MSE), summed on
  the device so ranks can all-reduce them.
- `evaluate`: everything people compare models by, once at the end: the IWAE-k NLL (k up to thousands, chunked
  so memory stays bounded), bits/dim, active units, KL per dimension and per group.
- `mutual_information_gap`: disentanglement (MIG, Chen et al. 2018) from latents and known factors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from vae.likelihoods import bits_per_dim, is_discrete
from vae.losses import elbo_terms, group_kls, log_weights, unwrap

# Order of the running sums kept on the device during evaluation.
_SUMS = ("elbo", "recon", "kl", "recon_mse")
ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al.: a unit is active when Var_x E_q[u] exceeds this


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 in [0, 1]."""
    return images.float().div_(255.0)


def _batch_terms(model: torch.nn.Module, x: torch.Tensor):
    """One forward: ELBO terms, per-group KL elements, posterior means, and the reconstruction MSE per image."""
    out = model(x)
    terms = elbo_terms(out, x, model.head)
    mu, _ = model.encode(x)
    mse = (model.decode(mu).float() - x.float()).pow(2).flatten(1).mean(1)
    return terms, group_kls(out), mu, mse


@torch.no_grad()
def evaluation_sums(model: torch.nn.Module, batches: Iterable[torch.Tensor], device: torch.device,
                    prepare: Callable[[torch.Tensor], torch.Tensor] = to_unit) -> torch.Tensor:
    """Per-image sums over the batches, as one float64 tensor (elbo, recon, kl, recon_mse, count).

    Kept on the device and summed there: one host sync at the end, and ranks can all-reduce it as it is.
    `prepare` turns the uint8 batch into model input (e.g. binarised). `recon_mse` is the per-pixel squared
    error of the decoded posterior mean, averaged over pixels per image.
    """
    model = unwrap(model)
    sums = torch.zeros(len(_SUMS) + 1, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    for images in batches:
        x = prepare(images.to(device, non_blocking=True))
        terms, _, _, mse = _batch_terms(model, x)
        sums[:-1] += torch.stack([terms.elbo, terms.recon, terms.kl, mse]).double().sum(1)
        sums[-1] += len(x)
    model.train(was_training)
    return sums


def to_metrics(sums: torch.Tensor) -> dict[str, float]:
    """Sums (possibly all-reduced over ranks) -> `val/*` metrics as floats."""
    values = sums.tolist()
    count = values[-1]
    if count == 0:
        raise ValueError("evaluation saw no images; check data.val_split")
    return {f"val/{name}": total / count for name, total in zip(_SUMS, values[:-1], strict=True)}


@torch.no_grad()
def iwae_log_likelihood(model: torch.nn.Module, x: torch.Tensor, k: int, max_rows: int = 8192) -> torch.Tensor:
    """The IWAE-k estimate of log p(x) per image (B,): log (1/k) sum_s p(x, z_s) / q(z_s | x).

    Memory is bounded by `max_rows` model rows per forward, whatever B and k: a forward holds min(k, max_rows)
    samples of max(1, max_rows // that) images, and chunks of samples are combined by a running logsumexp.
    """
    model = unwrap(model)
    samples = min(k, max_rows)
    result = []
    for xs in x.split(max(1, max_rows // samples)):
        partial = []  # logsumexp over each chunk of samples, (n,)
        for start in range(0, k, samples):
            s = min(samples, k - start)
            out = model(xs, samples=s)
            lw = log_weights(out, xs.repeat(s, *([1] * (xs.dim() - 1))), model.head)
            partial.append(torch.logsumexp(lw.view(s, -1).double(), dim=0))
        result.append(torch.logsumexp(torch.stack(partial), dim=0) - math.log(k))
    return torch.cat(result)


@dataclass
class Evaluation:
    metrics: dict[str, float]  # the fixed val/* names
    kl_per_dim: list[float]  # mean over the data, per flat latent dimension (encode's order)
    kl_per_group: list[float]  # mean over the data, per latent group, top first
    active: list[bool]  # per flat latent dimension: Var_x of the posterior mean > ACTIVE_UNIT_THRESHOLD


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[torch.Tensor], k: int = 100,
             prepare: Callable[[torch.Tensor], torch.Tensor] = to_unit, device: torch.device | str = "cpu",
             max_rows: int = 8192) -> Evaluation:
    """Every figure of one model on `batches` (uint8 (B, C, H, W) each): ELBO and parts, IWAE-k NLL, bits/dim
    from it, active units, KL per dimension and group, reconstruction MSE. Deterministic given the torch seed."""
    model = unwrap(model).to(device).eval()
    totals = None  # sums over images: elbo, recon, kl, recon_mse, count, -log p(x), KL per dim, per group, mu, mu^2
    dims = 0
    for images in batches:
        x = prepare(images.to(device))
        dims = x[0].numel()
        terms, kls, mu, mse = _batch_terms(model, x)
        per_image = torch.stack([terms.elbo, terms.recon, terms.kl, mse, torch.ones_like(mse)]).double().sum(1)
        nll = -iwae_log_likelihood(model, x, k, max_rows).sum().reshape(1)
        kl_dim, kl_group = torch.cat(kls, 1).double().sum(0), torch.stack([g.sum(1) for g in kls]).double().sum(1)
        batch = [per_image, nll, kl_dim, kl_group, mu.double().sum(0), mu.double().pow(2).sum(0)]
        totals = batch if totals is None else [a + b for a, b in zip(totals, batch, strict=True)]
    if totals is None:
        raise ValueError("evaluation saw no images; check data.val_split")
    sums, nll, kl_dims, kl_groups, mu_sum, mu_sq = totals
    n = sums[-1]
    variance = mu_sq / n - (mu_sum / n).pow(2)
    active = variance > ACTIVE_UNIT_THRESHOLD
    metrics = to_metrics(sums)
    metrics["val/nll_iwae"] = float(nll / n)
    metrics["val/bpd"] = float(bits_per_dim(metrics["val/nll_iwae"], dims, is_discrete(model.head.likelihood)))
    metrics["val/active_units"] = float(active.sum())
    return Evaluation(metrics, (kl_dims / n).tolist(), (kl_groups / n).tolist(), active.tolist())


def _discretise(values: np.ndarray, bins: int) -> np.ndarray:
    """Each column into `bins` equal-width bins over its range -> ints (N, D)."""
    lo, hi = values.min(0), values.max(0)
    scaled = (values - lo) / np.where(hi > lo, hi - lo, 1.0)
    return np.minimum((scaled * bins).astype(np.int64), bins - 1)


def _entropy(labels: np.ndarray) -> float:
    p = np.bincount(labels) / len(labels)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _mutual_information(a: np.ndarray, b: np.ndarray) -> float:
    """I(a; b) in nats for two non-negative int arrays, from their joint histogram."""
    joint = np.bincount(a * (b.max() + 1) + b).astype(np.float64)
    return _entropy(a) + _entropy(b) - float(-(p := joint[joint > 0] / len(a)) @ np.log(p))


def mutual_information_gap(latents: np.ndarray, factors: np.ndarray, bins: int = 20) -> float:
    """MIG: per factor, the gap between the two latents most informative about it, over the factor's entropy,
    averaged over factors (Chen et al. 2018). latents (N, D) continuous, e.g. posterior means; factors (N, F)
    discrete values of the known generative factors. 1: each factor captured by one latent alone; 0: none is.
    Latents are discretised into `bins` equal-width bins (the paper's estimator on a histogram)."""
    latents, factors = np.asarray(latents, dtype=np.float64), np.asarray(factors)
    if latents.ndim != 2 or factors.ndim != 2 or len(latents) != len(factors):
        raise ValueError(f"need latents (N, D) and factors (N, F), got {latents.shape} and {factors.shape}")
    if latents.shape[1] < 2:
        raise ValueError("MIG needs at least two latent dimensions")
    codes = _discretise(latents, bins)
    gaps = []
    for column in factors.T:
        v = np.unique(column, return_inverse=True)[1].reshape(-1)
        h = _entropy(v)
        if h == 0:
            continue  # a constant factor carries no information to capture
        mi = sorted((_mutual_information(codes[:, j], v) for j in range(codes.shape[1])), reverse=True)
        gaps.append((mi[0] - mi[1]) / h)
    if not gaps:
        raise ValueError("every factor is constant; MIG is undefined")
    return float(np.mean(gaps))
