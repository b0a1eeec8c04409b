"""Objectives as pure functions of a model output and the data: the ELBO and its parts, KL warm-up and free
bits, and the IWAE-k bound. Units: nats per image. The trainer calls `training_loss` and nothing else."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from vae.config import LossSection
from vae.models import Gaussian, VAEOutput
from vae.models.heads import Head
from vae.objectives.base import unwrap
from vae.objectives.elbo.likelihoods import log_likelihood

LOG_2PI = math.log(2 * math.pi)


class ELBOTerms(NamedTuple):
    loss: torch.Tensor  # scalar: what is minimised (recon + weighted, possibly free-bits KL; or -IWAE bound)
    elbo: torch.Tensor  # (B,): -(recon + kl), the evidence lower bound on log p(x)
    recon: torch.Tensor  # (B,): -log p(x|z), summed over pixels
    kl: torch.Tensor  # (B,): KL(q(z|x) || p(z)), summed over all latent groups


# Latent densities and KLs are computed in float64: a collapsed posterior reaches log-variances of -143 (seen on
# 105x105 glyphs), where exp(-logvar) overflows float32 (above 88) and 0 * inf gave a NaN NLL that cost a run.
# float64 holds exp(|logvar|) up to 709, far past any log-variance a float32 network emits; latents are
# (B, D) or (B, C, h, w) tensors, small beside the images, so the cost is negligible. The KLs go back to float32
# (a KL is a sum of non-negative terms, finite unless a variance ratio passes e^88); log densities stay float64,
# because log q(z) of a z rounded in float32 can pass -1e38 at such variances and IWAE subtracts it.


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Analytic KL(N(mu, exp(logvar)) || N(0, I)) per image (B,)."""
    mu, logvar = mu.double(), logvar.double()
    return (0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)).flatten(1).sum(1).float()


def kl_elements(q: Gaussian, p: Gaussian) -> torch.Tensor:
    """Analytic KL(q || p) per latent element, flattened to (B, D): the per-dimension KL.
    The variance ratio is exp(q_lv - p_lv), one exponential of a difference, never inf / inf."""
    q_mu, q_lv, p_mu, p_lv = (t.double().flatten(1) for t in (*q, *p))
    kl = 0.5 * (p_lv - q_lv + torch.exp(q_lv - p_lv) + ((q_mu - p_mu) * torch.exp(-0.5 * p_lv)).pow(2) - 1.0)
    return kl.float()


def group_kls(out: VAEOutput) -> list[torch.Tensor]:
    """Per group, the KL of each latent element (B, D_g). For lower groups it is analytic given the sampled
    groups above (NVAE's estimator): its mean over samples is the group's KL term of the ELBO."""
    return [kl_elements(g.q, g.p) for g in out.groups]


def gaussian_log_density(z: torch.Tensor, dist: Gaussian) -> torch.Tensor:
    """log N(z; dist) summed per row (B,), float64. The standardised distance (z - mu) * exp(-logvar / 2) is
    squared after the scaling, so a zero distance at a tiny variance gives 0, not 0 * inf."""
    z, mu, logvar = z.double(), dist.mu.double(), dist.logvar.double()
    return (-0.5 * (((z - mu) * torch.exp(-0.5 * logvar)).pow(2) + logvar + LOG_2PI)).flatten(1).sum(1)


def log_weights(out: VAEOutput, x: torch.Tensor, head: Head) -> torch.Tensor:
    """log p(x|z) + log p(z) - log q(z|x) for each row's sample (rows of `out`, x repeated to match): (k*B,)."""
    log_w = log_likelihood(head, out.params, x)
    for g in out.groups:
        log_w = log_w + gaussian_log_density(g.z, g.p) - gaussian_log_density(g.z, g.q)
    return log_w


def iwae_bound(log_w: torch.Tensor, k: int) -> torch.Tensor:
    """log (1/k) sum_s w_s per image from sample-major log-weights (k*B,) -> (B,). k = 1 is the ELBO."""
    return torch.logsumexp(log_w.view(k, -1), dim=0) - math.log(k)


def elbo_terms(out: VAEOutput, x: torch.Tensor, head: Head, beta: float = 1.0) -> ELBOTerms:
    recon = -log_likelihood(head, out.params, x)
    kl = sum(k.sum(1) for k in group_kls(out))
    return ELBOTerms(loss=(recon + beta * kl).mean(), elbo=-(recon + kl), recon=recon, kl=kl)


def kl_weight(cfg: LossSection, step: int) -> float:
    """beta, ramped linearly from 0 over the first `warmup_steps` optimiser steps: a pure function of the step."""
    if cfg.warmup_steps == 0:
        return cfg.beta
    return cfg.beta * min(1.0, step / cfg.warmup_steps)


def free_bits_kl(kls: list[torch.Tensor], nats: float, per: str) -> torch.Tensor:
    """Batch-mean KL with each dimension's (per="dim") or group's (per="group") mean held at >= `nats`
    (Kingma et al. 2016): below the floor the KL gets no gradient, so the encoder keeps those units in use."""
    if per == "dim":
        return torch.cat(kls, 1).mean(0).clamp(min=nats).sum()
    return torch.stack([k.sum(1).mean() for k in kls]).clamp(min=nats).sum()


def training_loss(model: torch.nn.Module, x: torch.Tensor, cfg: LossSection, step: int) -> ELBOTerms:
    """The objective the trainer minimises at optimiser step `step`. `model` may be DDP-wrapped: called once.

    objective "elbo": recon + w(step) * KL, with free bits when `cfg.free_bits` > 0. objective "iwae": minus the
    IWAE-k bound, the k samples per image drawn in the same forward (`samples=k`: the batch is k * B rows).
    """
    head = unwrap(model).head
    if cfg.objective == "iwae":
        k = cfg.iwae_k
        out = model(x, samples=k)
        xs = x.repeat(k, *([1] * (x.dim() - 1)))
        log_w = log_weights(out, xs, head)
        recon = -log_likelihood(head, out.params, xs).view(k, -1).mean(0)
        kl = sum(g.sum(1) for g in group_kls(out)).view(k, -1).mean(0)
        return ELBOTerms(loss=-iwae_bound(log_w, k).mean(), elbo=-(recon + kl), recon=recon, kl=kl)
    out = model(x)
    kls = group_kls(out)
    recon = -log_likelihood(head, out.params, x)
    kl = sum(k.sum(1) for k in kls)
    penalty = free_bits_kl(kls, cfg.free_bits, cfg.free_bits_per) if cfg.free_bits > 0 else kl.mean()
    return ELBOTerms(loss=recon.mean() + kl_weight(cfg, step) * penalty, elbo=-(recon + kl), recon=recon, kl=kl)
