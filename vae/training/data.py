"""The training side's view of the data: the loaders of a rank and the image shape the model is built for.

Only `pipeline`'s public API is used here (DESIGN.md: vae imports the loader API, nothing else of pipeline).
"""

from __future__ import annotations

import os

import torch

from pipeline import ShardFormatError, ShardLoader, open_loader, read_index
from vae.config import RunConfig


def _device() -> torch.device:
    """The device Accelerate chose for this process when it is set up (resident data goes there), else CPU."""
    from accelerate.state import PartialState

    return PartialState().device if PartialState._shared_state else torch.device("cpu")


def build_loaders(
    cfg: RunConfig, rank: int, world_size: int, device: torch.device | str | None = None
) -> tuple[ShardLoader, ShardLoader]:
    """Training loader (shuffled, equal batch counts on every rank) and validation loader (exact slices).

    Both are resident (decoded once onto `device`, default Accelerate's) when a split fits data.memory_budget_mb.
    """
    _check_splits(cfg)
    common = dict(
        batch_size=cfg.train.batch_size, rank=rank, world_size=world_size, seed=cfg.train.seed,
        resident=cfg.data.resident, memory_budget=cfg.data.memory_budget_mb << 20,
        device=device if device is not None else _device(), verify=cfg.data.verify,
        storage_options=cfg.ingest.storage_options, on_corrupt=cfg.data.on_corrupt_shard,
        workers=workers_per_rank(cfg, world_size), crop_size=cfg.data.crop_size,
        decode_device="device" if cfg.data.decode_device == "cuda" else "cpu",
    )
    if cfg.data.decode_device == "cuda" and torch.device(common["device"]).type != "cuda":
        raise ShardFormatError("data.decode_device cuda decodes JPEG batches on the training GPU, but this run "
                               f"trains on {common['device']}; use --data.decode_device cpu")
    train = open_loader(cfg.shard_dir, cfg.data.train_split, shuffle_buffer=cfg.data.shuffle_buffer,
                        flip=cfg.data.flip, **common)
    val = open_loader(cfg.shard_dir, cfg.data.val_split, shuffle=False, drop_last=False, pad=False, crop="centre",
                      **common)
    return train, val


def workers_per_rank(cfg: RunConfig, world_size: int) -> int:
    """data.workers, else this machine's cores shared by its ranks (the local ones: LOCAL_WORLD_SIZE)."""
    if cfg.data.workers is not None:
        return cfg.data.workers
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return max(1, (os.cpu_count() or 1) // max(1, local))


def image_shape(cfg: RunConfig) -> tuple[int, int, int]:
    """(C, H, W) of what the model sees: the stored images, or data.crop_size crops of them."""
    h, w, c = read_index(cfg.shard_dir, cfg.ingest.storage_options).image_shape
    return (c, *(cfg.data.crop_size or (h, w)))


def _check_splits(cfg: RunConfig) -> None:
    """Both splits the run reads exist, or a ShardFormatError that names both ways to fix it."""
    index = read_index(cfg.shard_dir, cfg.ingest.storage_options)
    wanted = {"data.train_split": cfg.data.train_split, "data.val_split": cfg.data.val_split}
    missing = {field: split for field, split in wanted.items() if split not in index.splits}
    if missing:
        named = ", ".join(f"{field} {split!r}" for field, split in missing.items())
        raise ShardFormatError(
            f"{cfg.shard_dir} has the split(s) {sorted(index.splits)} but not {named}. Either hold out a split 'test' "
            "at ingest (--ingest.test_fraction 0.1 --ingest.overwrite true), or train on the splits there are: "
            "--data.train_split and --data.val_split (the same split for both validates on training images)"
        )
