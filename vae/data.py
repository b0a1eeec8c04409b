"""The training side's view of the data: loaders for a rank, and uint8 batches -> model inputs.

Only `pipeline`'s public API is used here (DESIGN.md: vae imports the loader API, nothing else of pipeline).
"""

from __future__ import annotations

import torch

from pipeline import ShardLoader
from vae.config import RunConfig


def build_loaders(cfg: RunConfig, rank: int, world_size: int) -> tuple[ShardLoader, ShardLoader]:
    """Training loader (shuffled, equal batch counts on every rank) and validation loader (exact slices)."""
    common = dict(batch_size=cfg.train.batch_size, rank=rank, world_size=world_size, seed=cfg.train.seed)
    train = ShardLoader(cfg.shard_dir, cfg.data.train_split, shuffle_buffer=cfg.data.shuffle_buffer, **common)
    val = ShardLoader(cfg.shard_dir, cfg.data.val_split, shuffle=False, drop_last=False, pad=False, **common)
    return train, val


def to_input(images: torch.Tensor, cfg: RunConfig) -> torch.Tensor:
    """uint8 (B, C, H, W) on the device -> float32 model input in [0, 1]."""
    return images.float().div_(255.0)
