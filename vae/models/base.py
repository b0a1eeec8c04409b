"""The contract every architecture keeps: the typed output, the diagonal Gaussians, and the single-latent-layer base
class (see the package docstring, vae/models/__init__.py)."""


from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from vae.models.heads import Head


class Gaussian(NamedTuple):
    """A diagonal Gaussian; tensors of one shape, e.g. (B, D) or (B, C, h, w)."""

    mu: torch.Tensor
    logvar: torch.Tensor


class LatentGroup(NamedTuple):
    """One group of latents: its sample from q, the posterior q(z | x, z_above) and the prior p(z | z_above)."""

    z: torch.Tensor
    q: Gaussian
    p: Gaussian


class VAEOutput(NamedTuple):
    params: torch.Tensor  # (B, P, H, W): the decoder's parameters of p(x|z) per pixel, layout per `model.head`
    groups: tuple[LatentGroup, ...]  # top (first sampled) to bottom; a single-layer VAE has one


def standard_normal(like: torch.Tensor) -> Gaussian:
    return Gaussian(torch.zeros_like(like), torch.zeros_like(like))


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """z = mu + sigma * eps with eps ~ N(0, I): the sample stays differentiable in mu and logvar."""
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


class VAE(nn.Module):
    """Base of the single-latent-layer models (prior N(0, I)): subclasses define `encode` and `decode_params`.

    `likelihood` (and `mixtures`, `gaussian_std`) choose the output head: how many parameters per pixel the
    decoder emits and which pixel mean they imply (vae/models/heads.py); densities live in
    vae/objectives/elbo/likelihoods.py.
    """

    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int, likelihood: str = "bernoulli",
                 mixtures: int = 10, gaussian_std: float = 0.1):
        super().__init__()
        self.image_shape = tuple(int(n) for n in image_shape)
        self.latent_size = latent_dim
        self.head = Head.build(likelihood, self.image_shape[0], mixtures=mixtures, gaussian_std=gaussian_std)

    @classmethod
    def resolve_options(cls, options):
        """The architecture's options with what they leave to files filled in; most leave nothing."""
        return options

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) in [0, 1] -> mu, logvar (B, D)."""
        raise NotImplementedError

    def decode_params(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, D) -> the parameters of p(x|z), (B, head.channels, H, W)."""
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z -> pixel means in [0, 1]."""
        return self.head.mean(self.decode_params(z))

    def forward(self, x: torch.Tensor, samples: int = 1) -> VAEOutput:
        mu, logvar = self.encode(x)  # once per image, whatever `samples` is
        if samples > 1:
            mu, logvar = mu.repeat(samples, 1), logvar.repeat(samples, 1)
        z = reparameterize(mu, logvar)
        return VAEOutput(self.decode_params(z), (LatentGroup(z, Gaussian(mu, logvar), standard_normal(mu)),))


def check_divisible(arch: str, image_shape: tuple[int, int, int], factor: int, fix: str) -> None:
    """Fail at build time, before any training step, on an image side the architecture's strides cannot take."""
    _, h, w = image_shape
    if h % factor or w % factor:
        raise ValueError(f"model.arch {arch!r} needs image sides divisible by {factor}, got {h}x{w}: {fix}")
