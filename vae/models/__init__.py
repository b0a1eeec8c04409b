"""Model registry: a plain dict from architecture name to class; loud failures on unknown or duplicate names.

Model files are single-device code that return a `VAEOutput`; they import nothing of training, tracking,
orchestration or the data pipeline (a test guards that).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

MODELS: dict[str, type[nn.Module]] = {}


class VAEOutput(NamedTuple):
    logits: torch.Tensor  # (B, C, H, W): Bernoulli logits of p(x|z); sigmoid(logits) is the decoded mean
    mu: torch.Tensor  # (B, D): mean of q(z|x)
    logvar: torch.Tensor  # (B, D): log-variance of q(z|x)
    z: torch.Tensor  # (B, D): the reparameterised sample mu + sigma * eps


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """z = mu + sigma * eps with eps ~ N(0, I): the sample stays differentiable in mu and logvar."""
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


class VAE(nn.Module):
    """Base of the single-latent-layer models: subclasses define `encode` and `decode_logits`."""

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) in [0, 1] -> mu, logvar (B, D)."""
        raise NotImplementedError

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, D) -> Bernoulli logits (B, C, H, W)."""
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z -> pixel means in [0, 1] (the sigmoid output layer of the classic decoder)."""
        return torch.sigmoid(self.decode_logits(z))

    def forward(self, x: torch.Tensor) -> VAEOutput:
        mu, logvar = self.encode(x)
        z = reparameterize(mu, logvar)
        return VAEOutput(self.decode_logits(z), mu, logvar, z)


def register_model(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def add(cls: type[nn.Module]) -> type[nn.Module]:
        if name in MODELS:
            raise ValueError(f"model {name!r} is registered twice ({MODELS[name].__qualname__}, {cls.__qualname__})")
        MODELS[name] = cls
        return cls

    return add


def build_model(arch: str, image_shape: tuple[int, int, int], latent_dim: int, **options) -> nn.Module:
    """Instantiate `arch` for images of shape (C, H, W)."""
    if arch not in MODELS:
        raise ValueError(f"unknown model architecture {arch!r}; valid: {', '.join(sorted(MODELS))}")
    return MODELS[arch](image_shape=tuple(image_shape), latent_dim=latent_dim, **options)


from vae.models import conv, mlp  # noqa: E402,F401  (registers the built-in architectures)
