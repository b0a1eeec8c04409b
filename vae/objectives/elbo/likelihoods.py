"""Densities of p(x|z) as pure functions: log-likelihood per image (B,), in nats, float32.

The parameter layout of each likelihood is the model head's (vae/models/heads.py); `log_likelihood` reads it
from the model's `head`, so training, evaluation and the benchmark all score a model the way it was built.
Pixels x come in as float (B, C, H, W) in [0, 1]: binarised {0, 1}, or k / 255 for 8-bit data.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from vae.models.heads import Head

MIN_LOG_SCALE = -7.0  # floor of learned log-stds / log-scales: keeps densities finite on constant pixels


def bernoulli_log_prob(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log Bernoulli(x; sigmoid(logits)) summed over pixels (minus the binary cross-entropy), per image (B,).

    From logits in float32: the sigmoid-then-log form overflows in half precision and saturates at |logit| > 17.
    """
    return -F.binary_cross_entropy_with_logits(logits.float(), x.float(), reduction="none").flatten(1).sum(1)


def gaussian_log_prob(mean: torch.Tensor, log_std: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, exp(log_std)^2) summed over pixels, per image (B,). A density on [0, 1]^D, not a probability."""
    mean, log_std, x = mean.float(), log_std.float(), x.float()
    return (-0.5 * ((x - mean) * torch.exp(-log_std)).pow(2) - log_std - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)


def discretized_logistic_mixture_log_prob(logits: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor,
                                          x: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """log P(x) under a mixture of logistics discretised to `bins` levels (PixelCNN++), per image (B,).

    logits (B, K, H, W) are shared by the channels of a pixel; means and log_scales (B, K, C, H, W) live on the
    [-1, 1] scale. Level k of x = k / (bins - 1) owns [c - 1/(bins-1), c + 1/(bins-1)] around c = 2k/(bins-1) - 1,
    and the end levels take the tails to -inf and +inf, so the probabilities of the `bins` levels sum to one.
    x is rounded to its level first (dequantisation noise would otherwise shift the bin).
    """
    logits, means, log_scales = logits.float(), means.float(), log_scales.float().clamp(min=MIN_LOG_SCALE)
    levels = bins - 1
    k = torch.round(x.float() * levels).unsqueeze(1)  # (B, 1, C, H, W), integers 0..levels
    centred = 2 * k / levels - 1 - means
    inv_s = torch.exp(-log_scales)
    plus, minus = inv_s * (centred + 1 / levels), inv_s * (centred - 1 / levels)
    log_cdf_plus = plus - F.softplus(plus)  # log sigmoid(plus): the lowest level's mass
    log_sf_minus = -F.softplus(minus)  # log (1 - sigmoid(minus)): the highest level's mass
    cdf_delta = torch.sigmoid(plus) - torch.sigmoid(minus)
    # Where the bin's mass underflows float32, the density at the centre times the bin width (2 / levels).
    mid = inv_s * centred
    log_pdf_mid = mid - log_scales - 2 * F.softplus(mid) + math.log(2 / levels)
    log_mid = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)), log_pdf_mid)
    log_p = torch.where(k == 0, log_cdf_plus, torch.where(k == levels, log_sf_minus, log_mid))
    per_component = log_p.sum(2) + torch.log_softmax(logits, dim=1)  # (B, K, H, W)
    return torch.logsumexp(per_component, dim=1).flatten(1).sum(1)


def _bernoulli(head: Head, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return bernoulli_log_prob(params, x)


def _gaussian(head: Head, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    log_std = torch.full_like(params, math.log(head.gaussian_std), dtype=torch.float32)
    return gaussian_log_prob(torch.sigmoid(params.float()), log_std, x)


def _gaussian_learned(head: Head, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    mean, log_std = params.float().chunk(2, dim=1)
    return gaussian_log_prob(torch.sigmoid(mean), log_std.clamp(min=MIN_LOG_SCALE), x)


def _logistic_mixture(head: Head, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return discretized_logistic_mixture_log_prob(*head.split_mixture(params), x)


# likelihood name -> (log p(x | params) per image, whether it is a probability of discrete pixel values)
LIKELIHOODS: dict[str, tuple[Callable[[Head, torch.Tensor, torch.Tensor], torch.Tensor], bool]] = {
    "bernoulli": (_bernoulli, True),
    "gaussian": (_gaussian, False),
    "gaussian_learned": (_gaussian_learned, False),
    "logistic_mixture": (_logistic_mixture, True),
}


def log_likelihood(head: Head, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log p(x|z) per image (B,) for a decoder output `params` laid out as `head` says."""
    return LIKELIHOODS[head.likelihood][0](head, params, x)


def is_discrete(likelihood: str) -> bool:
    return LIKELIHOODS[likelihood][1]


def bits_per_dim(nll: torch.Tensor | float, dims: int, discrete: bool, bins: int = 256) -> torch.Tensor | float:
    """Nats per image -> bits per dimension.

    A discrete likelihood's NLL is already -log2 P over the pixel values: nll / (dims ln 2). A density on
    [0, 1]^D is moved to the [0, bins)^D scale of the 8-bit values first, -log p + D ln(bins), which is the usual
    upper bound on the discrete NLL when the data were uniformly dequantised: (x + U[0,1)) / bins.
    """
    shift = 0.0 if discrete else dims * math.log(bins)
    return (nll + shift) / (dims * math.log(2))
