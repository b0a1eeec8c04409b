"""The MLP VAE of the PyTorch example (784-400-latent), for any image size."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from vae.models import VAE, register_model


@register_model("mlp")
class MLPVAE(VAE):
    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int = 2, hidden_dim: int = 400):
        super().__init__()
        self.image_shape = tuple(image_shape)
        pixels = math.prod(image_shape)
        self.hidden = nn.Linear(pixels, hidden_dim)
        self.mu = nn.Linear(hidden_dim, latent_dim)
        self.logvar = nn.Linear(hidden_dim, latent_dim)
        self.decoder = nn.Sequential(nn.Linear(latent_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, pixels))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.hidden(x.flatten(1)))
        return self.mu(h), self.logvar(h)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z).view(-1, *self.image_shape)
