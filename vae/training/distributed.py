"""What the ranks of one run agree on: the precision they train in, the shards any of them skipped, and a
checksum that tells whether DDP kept their weights in step."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator

from pipeline import ShardLoader
from vae.config import RunConfig


def param_checksum(models: list[torch.nn.Module]) -> torch.Tensor:
    """Sum of all parameters in float64: equal on every rank iff DDP kept the replicas in step."""
    return torch.stack([p.detach().double().sum() for m in models for p in m.parameters()]).sum()


def resolve_precision(cfg: RunConfig) -> str:
    """`auto`: what `accelerate launch --mixed_precision` named, else bf16 where the GPU has it, else fp32."""
    if cfg.train.mixed_precision != "auto":
        return cfg.train.mixed_precision
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher != "no":
        return launcher
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def skipped_shards(accelerator: Accelerator, loaders: dict[str, ShardLoader]) -> dict[str, list[str]]:
    """Per split, the shards any rank skipped as corrupt so far: a rank knows only those it read (one all-reduce)."""
    mask = [name in loader.skipped_shards for loader in loaders.values() for name in loader.names]
    hits = accelerator.reduce(torch.tensor(mask, dtype=torch.float32, device=accelerator.device), "sum").tolist()
    out, first = {}, 0
    for split, loader in loaders.items():
        mine = hits[first : first + len(loader.names)]
        out[split] = [name for name, hit in zip(loader.names, mine, strict=True) if hit]
        first += len(loader.names)
    return out
