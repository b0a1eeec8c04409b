"""The classic convolutional VAE (two strided 5x5 convs down, two upsample + 5x5 convs up), any image size."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from vae.models import VAE, register_model


@register_model("conv")
class ConvVAE(VAE):
    """Encoder: conv 5x5/2 -> 64, LeakyReLU(0.2), conv 5x5/2 -> 128, LeakyReLU, flatten, dense mu and logvar.
    Decoder: dense -> (128, H/4, W/4), LeakyReLU, upsample x2, conv 5x5 -> 64, LeakyReLU, upsample x2,
    conv 5x5 -> the head's parameters per pixel (C logits for a Bernoulli). Images whose H or W is not a
    multiple of 4 are zero-padded on the way in and the output is cropped back, so any size works.
    """

    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int = 2, channels: tuple[int, int] = (64, 128),
                 **head):
        super().__init__(image_shape, latent_dim, **head)
        c, h, w = self.image_shape
        self.padded = (4 * math.ceil(h / 4), 4 * math.ceil(w / 4))
        c1, c2 = channels
        self.grid = (c2, self.padded[0] // 4, self.padded[1] // 4)
        features = c2 * self.grid[1] * self.grid[2]
        self.encoder = nn.Sequential(
            nn.Conv2d(c, c1, 5, stride=2, padding=2), nn.LeakyReLU(0.2),
            nn.Conv2d(c1, c2, 5, stride=2, padding=2), nn.LeakyReLU(0.2),
            nn.Flatten(),
        )
        self.mu = nn.Linear(features, latent_dim)
        self.logvar = nn.Linear(features, latent_dim)
        self.project = nn.Sequential(nn.Linear(latent_dim, features), nn.LeakyReLU(0.2))
        self.decoder = nn.Sequential(
            nn.Upsample(scale_factor=2), nn.Conv2d(c2, c1, 5, padding=2), nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2), nn.Conv2d(c1, self.head.channels, 5, padding=2),
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = self.image_shape[1:]
        x = F.pad(x, (0, self.padded[1] - w, 0, self.padded[0] - h))
        features = self.encoder(x)
        return self.mu(features), self.logvar(features)

    def decode_params(self, z: torch.Tensor) -> torch.Tensor:
        h, w = self.image_shape[1:]
        params = self.decoder(self.project(z).view(-1, *self.grid))
        return params[:, :, :h, :w]  # crop the padding added in encode
