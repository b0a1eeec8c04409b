"""A residual convolutional VAE: `depth` stride-2 stages of residual blocks each side, a dense latent."""

import torch
from torch import nn

from vae.models.base import VAE, check_divisible
from vae.models.blocks import down, stage, up
from vae.models.options import ResNetOptions


class ResNetVAE(VAE):
    """Encoder: 3x3 stem -> `width`; per stage `blocks` residual blocks then a stride-2 conv doubling the
    channels (capped at 4 x width); flatten; dense mu and logvar. The decoder mirrors it with nearest upsampling.
    Sides must be divisible by 2**depth (28 px takes depth <= 2, 32 and 64 px depth <= 5).
    """

    Options = ResNetOptions


    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int = 32, width: int = 32, depth: int = 2,
                 blocks: int = 1, **head):
        super().__init__(image_shape, latent_dim, **head)
        c, h, w = self.image_shape
        check_divisible("resnet", self.image_shape, 2**depth,
                        f"lower --model.depth (now {depth}) or resize the images at ingest")
        chans = [width * min(2**i, 4) for i in range(depth + 1)]  # channels at each resolution, top = coarsest
        self.grid = (chans[-1], h // 2**depth, w // 2**depth)
        features = chans[-1] * self.grid[1] * self.grid[2]
        enc: list[nn.Module] = [nn.Conv2d(c, width, 3, padding=1)]
        for i in range(depth):
            enc += [stage(chans[i], blocks), down(chans[i], chans[i + 1])]
        enc += [stage(chans[-1], blocks), nn.SiLU(), nn.Flatten()]
        self.encoder = nn.Sequential(*enc)
        self.mu = nn.Linear(features, latent_dim)
        self.logvar = nn.Linear(features, latent_dim)
        self.project = nn.Linear(latent_dim, features)
        dec: list[nn.Module] = [stage(chans[-1], blocks)]
        for i in reversed(range(depth)):
            dec += [up(chans[i + 1], chans[i]), stage(chans[i], blocks)]
        dec += [nn.SiLU(), nn.Conv2d(width, self.head.channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder(x)
        return self.mu(features), self.logvar(features)

    def decode_params(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.project(z).view(-1, *self.grid))
