"""Augmentations for photos as plain functions on uint8 batches (B, C, H, W), on whatever device they are.

The random parameters are drawn by the loader from a generator seeded by (seed, epoch, rank, batch), so a
resumed run crops and flips exactly as an uninterrupted one; the functions themselves are deterministic.
"""

from __future__ import annotations

import numpy as np
import torch


def draw(rng: np.random.Generator, n: int, height: int, width: int, size: tuple[int, int], flip: bool) -> np.ndarray:
    """(n, 3) int64: per image the crop's top and left and whether to flip it horizontally."""
    tops = rng.integers(0, height - size[0] + 1, n)
    lefts = rng.integers(0, width - size[1] + 1, n)
    flips = rng.random(n) < 0.5 if flip else np.zeros(n, bool)
    return np.stack([tops, lefts, flips.astype(np.int64)], axis=1)


def centre(n: int, height: int, width: int, size: tuple[int, int]) -> np.ndarray:
    """The parameters of a centre crop, no flip: what evaluation uses."""
    return np.tile([(height - size[0]) // 2, (width - size[1]) // 2, 0], (n, 1)).astype(np.int64)


def crop_flip(images: torch.Tensor, params: np.ndarray | torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop each image of (B, C, H, W) at its own (top, left) to `size`, mirrored where its flip is set.

    One gather for the whole batch (rows and columns are index tensors, flipped columns simply run backwards),
    so on a GPU it is one kernel, not B slices.
    """
    params = torch.as_tensor(params, device=images.device)
    h, w = size
    rows = params[:, 0:1] + torch.arange(h, device=images.device)  # (B, h)
    steps = torch.arange(w, device=images.device)
    cols = params[:, 1:2] + torch.where(params[:, 2:3].bool(), w - 1 - steps, steps)  # (B, w)
    b = torch.arange(len(images), device=images.device)[:, None, None]
    out = images.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]]  # (B, h, w, C)
    return out.permute(0, 3, 1, 2)  # channels-last in memory, as the loaders hand batches out
