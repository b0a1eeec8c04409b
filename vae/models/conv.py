"""The classic convolutional VAE (two strided 5x5 convs down, two upsample + 5x5 convs up), any image size."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from vae.models.base import VAE
from vae.models.options import ConvOptions


class ConvVAE(VAE):
    """Encoder: conv 5x5/2 -> 64, LeakyReLU(0.2), conv 5x5/2 -> 128, LeakyReLU, flatten, dense mu and logvar.
    Decoder: dense -> (128, H/4, W/4), LeakyReLU, upsample x2, conv 5x5 -> 64, LeakyReLU, upsample x2,
    conv 5x5 -> the head's parameters per pixel (C logits for a Bernoulli). Images whose H or W is not a
    multiple of 4 are zero-padded on the way in and the output is cropped back, so any size works.

    The decoder's parameters are those 5x5 convolutions, but each upsample+conv is computed as its exact
    sub-pixel form (`subpixel_conv`): 36 multiply-adds per output pixel and channel pair instead of 100, and no
    upsampled tensor. `reference_decode_params` is the literal upsample+conv path (tests, FLOP counts).
    """

    Options = ConvOptions


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
        _, first, _, _, last = self.decoder
        hidden = F.leaky_relu(subpixel_conv(self.project(z).view(-1, *self.grid), first), 0.2)
        return subpixel_conv(hidden, last)[:, :, :h, :w]  # crop the padding added in encode

    def reference_decode_params(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder exactly as written (nearest upsample, then conv 5x5): what decode_params computes."""
        h, w = self.image_shape[1:]
        return self.decoder(self.project(z).view(-1, *self.grid))[:, :, :h, :w]


def phase_taps(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(2, 3, 5) 0/1: for output phase p (row parity after a nearest 2x upsample), which of a 5x5 kernel's taps
    (offsets -2..2 at the high resolution) read input offset -1, 0 or +1 at the low resolution: tap t of phase p
    reads floor((2i + p + t - 2) / 2) - i. Built on `device` from aranges: no host tensor to copy every step."""
    phase, offset, tap = (torch.arange(n, device=device).view(shape) for n, shape in
                          ((2, (2, 1, 1)), (3, (1, 3, 1)), (5, (1, 1, 5))))
    return (torch.div(phase + tap - 2, 2, rounding_mode="floor") + 1 == offset).to(dtype)


def subpixel_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """conv(upsample_nearest_2x(x)) for a 5x5 conv with padding 2, computed without the upsample: each of the
    four output phases is a 3x3 conv of `x` whose weights are sums of the 5x5 taps that land on the same input
    pixel; the phases come out as 4x the channels and a pixel shuffle interleaves them. Gradients reach the 5x5
    weights through the (linear) tap sums, so training is unchanged."""
    taps = phase_taps(conv.weight.device, conv.weight.dtype)
    weight = torch.einsum("ard,bse,oide->oabirs", taps, taps, conv.weight).flatten(0, 2)  # (4 Cout, Cin, 3, 3)
    out = F.conv2d(x, weight, conv.bias.repeat_interleave(4), padding=1)
    return F.pixel_shuffle(out, 2)
