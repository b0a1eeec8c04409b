"""Validation figures, as functions of a model and batches of images. Nats per image unless stated.

- `evaluation_sums` / `to_metrics`: the cheap per-epoch figures (ELBO, its parts, reconstruction MSE), summed on
  the device so ranks can all-reduce them.
- `evaluate`: everything people compare models by, once at the end: the IWAE-k NLL (k up to thousands, chunked
  over images and samples so memory stays within a budget), bits/dim, active units, KL per dimension and per
  group. It is `evaluation_totals` (per rank, all-reducible sums) then `summarize`; vae/training/finalize.py runs the
  same two on every training rank.
- `mutual_information_gap`: disentanglement (MIG, Chen et al. 2018) from latents and known factors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from vae.objectives.base import unwrap
from vae.objectives.elbo.likelihoods import bits_per_dim, is_discrete
from vae.objectives.elbo.losses import elbo_terms, group_kls, log_weights
from vae.objectives.inputs import to_unit

# Order of the running sums kept on the device during evaluation.
_SUMS = ("elbo", "recon", "kl", "recon_mse")
ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al.: a unit is active when Var_x E_q[u] exceeds this


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


# Peak bytes of a no-grad forward per model row (one image, one sample) and image pixel, measured on CPU at
# 112x92 (conv 185, resnet 747, mlp 28) and rounded up; the likelihood's own float32 temporaries (about eight
# per decoder output channel for the logistic mixture) come on top. Used to turn a memory budget into rows.
BYTES_PER_ROW_PIXEL = 1024
BYTES_PER_OUTPUT_CHANNEL = 32


def rows_within(model: torch.nn.Module, memory_budget: int) -> int:
    """Model rows (images x importance samples) one forward may hold within `memory_budget` bytes; at least 1."""
    model = unwrap(model)
    _, h, w = model.image_shape
    per_row = h * w * (BYTES_PER_ROW_PIXEL + BYTES_PER_OUTPUT_CHANNEL * model.head.channels)
    return max(1, memory_budget // per_row)


@torch.no_grad()
def iwae_log_likelihood(model: torch.nn.Module, x: torch.Tensor, k: int, max_rows: int = 8192) -> torch.Tensor:
    """The IWAE-k estimate of log p(x) per image (B,): log (1/k) sum_s p(x, z_s) / q(z_s | x).

    Memory is bounded by `max_rows` model rows per forward, whatever B and k: a forward holds min(k, max_rows)
    samples of max(1, max_rows // that) images, and chunks of samples are combined by a running logsumexp
    (float64), so the result is that of one logsumexp over all k.
    """
    model = unwrap(model)
    samples = min(k, max_rows)
    result = []
    for xs in x.split(max(1, max_rows // samples)):
        running = None  # logsumexp over the samples so far, (n,)
        for start in range(0, k, samples):
            s = min(samples, k - start)
            out = model(xs, samples=s)
            lw = log_weights(out, xs.repeat(s, *([1] * (xs.dim() - 1))), model.head)
            chunk = torch.logsumexp(lw.view(s, -1).double(), dim=0)
            running = chunk if running is None else torch.logaddexp(running, chunk)
        result.append(running - math.log(k))
    return torch.cat(result)


@dataclass
class Evaluation:
    metrics: dict[str, float]  # the fixed val/* names
    kl_per_dim: list[float]  # mean over the data, per flat latent dimension (encode's order)
    kl_per_group: list[float]  # mean over the data, per latent group, top first
    active: list[bool]  # per flat latent dimension: Var_x of the posterior mean > ACTIVE_UNIT_THRESHOLD
    nonfinite: dict[str, str] = field(default_factory=dict)  # metric name -> why it is NaN or infinite


# Layout of the totals vector: these sums, then KL per dimension (D), per group (G), sum of mu (D), of mu^2 (D).
_TOTALS = ("elbo", "recon", "kl", "recon_mse", "count", "nll", "nonfinite_nll", "nonfinite_elbo")


def _group_count(model: torch.nn.Module, device: torch.device | str) -> int:
    """Latent groups of `model`, from one forward of a blank image that leaves the random state as it was."""
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        return len(model(torch.zeros(1, *model.image_shape, device=device)).groups)


@torch.no_grad()
def evaluation_totals(model: torch.nn.Module, batches: Iterable[torch.Tensor], k: int = 100,
                      prepare: Callable[[torch.Tensor], torch.Tensor] = to_unit, device: torch.device | str = "cpu",
                      max_rows: int = 8192, progress: tqdm | None = None) -> torch.Tensor:
    """This process's sums over `batches` (uint8 (B, C, H, W) each) as one float64 vector on `device`: ranks
    all-reduce it (a sum) and `summarize` turns it into figures. At most `max_rows` model rows per forward:
    batches are split into chunks of images, and `iwae_log_likelihood` chunks the samples. `progress` (a tqdm
    bar counting images) advances per chunk."""
    model = unwrap(model).to(device).eval()
    totals = None
    for images in batches:
        for x in prepare(images.to(device)).split(max_rows):
            terms, kls, mu, mse = _batch_terms(model, x)
            log_p = iwae_log_likelihood(model, x, k, max_rows)
            fixed = torch.stack([terms.elbo.double().sum(), terms.recon.double().sum(), terms.kl.double().sum(),
                                 mse.double().sum(), log_p.new_tensor(len(x)), -log_p.sum(),
                                 (~torch.isfinite(log_p)).sum().double(), (~torch.isfinite(terms.elbo)).sum().double()])
            kl_dim, kl_group = torch.cat(kls, 1).double().sum(0), torch.stack([g.sum(1) for g in kls]).double().sum(1)
            part = torch.cat([fixed, kl_dim, kl_group, mu.double().sum(0), mu.double().pow(2).sum(0)])
            totals = part if totals is None else totals + part
            if progress is not None:
                progress.update(len(x))
    if totals is None:  # this rank's slice is empty: zeros of the right length, so the all-reduce still matches
        size = len(_TOTALS) + 3 * model.latent_size + _group_count(model, device)
        totals = torch.zeros(size, dtype=torch.float64, device=device)
    return totals


def summarize(totals: torch.Tensor, model: torch.nn.Module) -> Evaluation:
    """Totals (summed over ranks) -> the figures: val/* metrics, KL per dimension and group, active units.
    A metric that is NaN or infinite stays so, with the reason in `nonfinite` (it must never stop the run)."""
    model = unwrap(model)
    values = totals.double().cpu()
    fixed = dict(zip(_TOTALS, values[: len(_TOTALS)].tolist(), strict=True))
    d = model.latent_size
    rest = values[len(_TOTALS):]
    kl_dims, kl_groups, mu_sum, mu_sq = rest[:d], rest[d:-2 * d], rest[-2 * d:-d], rest[-d:]
    n = fixed["count"]
    if n == 0:
        raise ValueError("evaluation saw no images; check data.val_split")
    variance = mu_sq / n - (mu_sum / n).pow(2)
    active = variance > ACTIVE_UNIT_THRESHOLD
    metrics = {f"val/{name}": fixed[name] / n for name in _SUMS}
    metrics["val/nll_iwae"] = fixed["nll"] / n
    dims = math.prod(model.image_shape)
    metrics["val/bpd"] = float(bits_per_dim(metrics["val/nll_iwae"], dims, is_discrete(model.head.likelihood)))
    metrics["val/active_units"] = float(active.sum())
    iwae = ("nonfinite_nll", "the IWAE estimate of log p(x)")
    nonfinite = {}
    for name, value in metrics.items():
        if not math.isfinite(value):
            count, what = iwae if name in ("val/nll_iwae", "val/bpd") else ("nonfinite_elbo", "the ELBO")
            nonfinite[name] = (f"{name} is {value}: {what} was not finite for {int(fixed[count])} of {int(n)} "
                               "images (a posterior or decoder variance out of float range?)")
    return Evaluation(metrics, (kl_dims / n).tolist(), (kl_groups / n).tolist(), active.tolist(), nonfinite)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[torch.Tensor], k: int = 100,
             prepare: Callable[[torch.Tensor], torch.Tensor] = to_unit, device: torch.device | str = "cpu",
             max_rows: int | None = None, memory_budget: int = 1 << 30) -> Evaluation:
    """Every figure of one model on `batches` (uint8 (B, C, H, W) each) in one process: ELBO and parts, IWAE-k
    NLL, bits/dim from it, active units, KL per dimension and group, reconstruction MSE. Deterministic given the
    torch seed. Forwards hold at most `max_rows` rows, by default what `memory_budget` bytes allow."""
    max_rows = max_rows or rows_within(model, memory_budget)
    return summarize(evaluation_totals(model, batches, k, prepare, device, max_rows), model)


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
