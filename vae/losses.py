"""The ELBO and its parts, as pure functions of a model output and the data. Units: nats per image."""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from vae.config import LossSection
from vae.models import VAEOutput


class ELBOTerms(NamedTuple):
    loss: torch.Tensor  # scalar: mean over the batch of recon + beta * kl, what is minimised
    elbo: torch.Tensor  # (B,): -(recon + kl), the evidence lower bound on log p(x)
    recon: torch.Tensor  # (B,): -log p(x|z), summed over pixels
    kl: torch.Tensor  # (B,): KL(q(z|x) || N(0, I))


def bernoulli_nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log Bernoulli(x; sigmoid(logits)) summed over pixels (binary cross-entropy), per image (B,).

    Computed from logits in float32: the sigmoid-then-BCE form overflows in half precision.
    """
    return F.binary_cross_entropy_with_logits(logits.float(), x.float(), reduction="none").flatten(1).sum(1)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Analytic KL(N(mu, exp(logvar)) || N(0, I)) per image (B,)."""
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)


def elbo_terms(out: VAEOutput, x: torch.Tensor, beta: float = 1.0) -> ELBOTerms:
    recon = bernoulli_nll(out.logits, x)
    kl = gaussian_kl(out.mu, out.logvar)
    return ELBOTerms(loss=(recon + beta * kl).mean(), elbo=-(recon + kl), recon=recon, kl=kl)


def training_loss(model: torch.nn.Module, x: torch.Tensor, cfg: LossSection, step: int) -> ELBOTerms:
    """The objective the trainer minimises at optimiser step `step`. `model` may be DDP-wrapped: call it once."""
    return elbo_terms(model(x), x, cfg.beta)
