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
