"""Residual building blocks shared by the `resnet` and `hvae` architectures. No normalisation layers: the
IWAE bound repeats each image k times in one batch, and batch statistics would couple those samples."""

import torch
from torch import nn


class ResBlock(nn.Module):
    """x + conv3x3(SiLU(conv3x3(SiLU(x)))), the last conv zero-initialised so a fresh block is the identity
    (deep stacks start stable, the VDVAE trick without its per-depth scaling)."""

    def __init__(self, channels: int, bottleneck: int | None = None):
        super().__init__()
        mid = bottleneck or channels
        self.body = nn.Sequential(
            nn.SiLU(), nn.Conv2d(channels, mid, 3, padding=1), nn.SiLU(), nn.Conv2d(mid, channels, 3, padding=1),
        )
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def stage(channels: int, blocks: int) -> nn.Sequential:
    return nn.Sequential(*(ResBlock(channels) for _ in range(blocks)))


def down(c_in: int, c_out: int) -> nn.Module:
    """Halve H and W (stride-2 4x4 conv)."""
    return nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)


def up(c_in: int, c_out: int) -> nn.Module:
    """Double H and W (nearest upsample, then a 3x3 conv: no checkerboard artefacts of transposed convs)."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, padding=1))
