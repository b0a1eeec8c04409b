"""The MLP VAE of the PyTorch example (784-400-latent), deeper on request, for any image size."""

import math

import torch
from torch import nn

from vae.models.base import VAE
from vae.models.options import MLPOptions


def _tower(sizes: list[int]) -> nn.Sequential:
    """Linear + ReLU for each consecutive pair of `sizes`."""
    return nn.Sequential(*(m for a, b in zip(sizes, sizes[1:], strict=False) for m in (nn.Linear(a, b), nn.ReLU())))


class MLPVAE(VAE):
    """`hidden_layers` ReLU layers of `hidden_dim` units each side (1: the PyTorch example; Burda et al. use 2)."""

    Options = MLPOptions


    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int = 2, hidden_dim: int = 400,
                 hidden_layers: int = 1, **head):
        super().__init__(image_shape, latent_dim, **head)
        pixels = math.prod(self.image_shape)
        widths = [hidden_dim] * hidden_layers
        self.encoder = _tower([pixels, *widths])
        self.mu = nn.Linear(hidden_dim, latent_dim)
        self.logvar = nn.Linear(hidden_dim, latent_dim)
        out = self.head.channels * math.prod(self.image_shape[1:])
        self.decoder = nn.Sequential(_tower([latent_dim, *widths]), nn.Linear(hidden_dim, out))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x.flatten(1))
        return self.mu(h), self.logvar(h)

    def decode_params(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z).view(-1, self.head.channels, *self.image_shape[1:])
