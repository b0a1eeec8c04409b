"""How a caller gets at a split: `open_loader` builds the loader that fits it (images or latents, by index.json's
`format`; resident or streamed), `read_split` reads all of it at once, for evaluation and plots, and `read_captions`
gives each sample's key and caption."""

from __future__ import annotations

import os
from typing import Any, Literal

import numpy as np

from pipeline.errors import ShardFormatError
from pipeline.latents import FORMAT_NAME as LATENT_FORMAT
from pipeline.latents import index_format
from pipeline.latents import read_index as read_latent_index
from pipeline.layouts import get_layout
from pipeline.loader.base import ShardLoader
from pipeline.loader.corrupt import OnCorrupt
from pipeline.loader.latents import LatentLoader, latent_bytes
from pipeline.loader.resident import ResidentLoader, read_whole
from pipeline.loader.streamed import StreamedLoader
from pipeline.shards import read_index
from pipeline.storage import Location

Resident = Literal["auto", "on", "off"]


def open_loader(
    shard_dir: str | os.PathLike, split: str, batch_size: int, *, resident: Resident = "off",
    memory_budget: int = 2 << 30, storage_options: dict | None = None, **options: Any,
) -> ShardLoader:
    """The loader of one split for one rank: a `ResidentLoader` (the split decoded once onto `device`) when
    `resident` is 'on', or 'auto' and the decoded split fits `memory_budget` bytes; else a `StreamedLoader` (read
    shard by shard each epoch). Both yield the same batches. `options` are `ShardLoader`'s other keyword
    arguments (rank, world_size, seed, device, workers, ...).

    A latent directory (`vaepipe encode`'s) gets a `LatentLoader` yielding `LatentBatch`es, resident by the same
    rule (its arrays as stored against `memory_budget`)."""
    if resident not in ("auto", "on", "off"):
        raise ValueError(f"resident must be 'auto', 'on' or 'off', got {resident!r}")
    location = Location(shard_dir, storage_options)
    if index_format(location) == LATENT_FORMAT:
        fits = resident == "on" or (
            resident == "auto" and latent_bytes(read_latent_index(location), split) <= memory_budget)
        return LatentLoader(shard_dir, split, batch_size, resident=fits, storage_options=storage_options, **options)
    fits = resident == "on" or (
        resident == "auto" and decoded_bytes(shard_dir, split, storage_options) <= memory_budget)
    kind = ResidentLoader if fits else StreamedLoader
    return kind(shard_dir, split, batch_size, storage_options=storage_options, **options)


def decoded_bytes(shard_dir: str | os.PathLike, split: str, storage_options: dict | None = None) -> int:
    """Bytes of the split's images decoded (uint8), from index.json alone."""
    index = read_index(shard_dir, storage_options)
    return index.split(split).num_samples * int(np.prod(index.image_shape))


def read_split(
    shard_dir: str | os.PathLike,
    split: str,
    storage_options: dict | None = None,
    with_factors: bool = False,
    verify: bool = False,
    on_corrupt: OnCorrupt = "fail",
    workers: int = 0,
    crop_size: tuple[int, int] | None = None,
) -> tuple:
    """A whole split in file order: uint8 images (N, H, W, C) and labels (N,) or None. For evaluation and plots.

    with_factors=True adds the factors (N, K) float32, or None, as a third element. on_corrupt='skip' leaves
    corrupt shards out, with a warning naming each. crop_size: the centre (H, W) crop of each image.
    """
    loader = StreamedLoader(shard_dir, split, batch_size=1, shuffle=False, drop_last=False, pad=False,
                            storage_options=storage_options, verify=verify, on_corrupt=on_corrupt, workers=workers,
                            crop_size=crop_size, crop="centre")
    images, labels, factors = read_whole(loader)
    if crop_size is not None:  # the centre crop evaluation uses
        images = loader._augment(images, loader._crop_params(0, len(images)))
    images = images.permute(0, 2, 3, 1).contiguous().numpy()
    labels = None if labels is None else labels.numpy()
    factors = None if factors is None else factors.numpy()
    return (images, labels, factors) if with_factors else (images, labels)


def read_captions(
    shard_dir: str | os.PathLike, split: str, storage_options: dict | None = None
) -> list[tuple[str, str | None]]:
    """Each sample's (key, caption) of a split, in file order: the order of `read_split`'s images and of a loader
    with shuffle=False. The caption is None throughout when the split has none (index.json's `captions`).

    Reads the keys' and captions' tar members only, never an image: ~one small member per block of images.
    """
    location = Location(shard_dir, storage_options)
    index = read_index(location)
    layout, info = get_layout(index.layout), index.split(split)
    pairs: list[tuple[str, str | None]] = []
    for shard in info.shards:
        with location.open(shard.name) as f:
            keys, texts = layout.annotations(f)
        if len(keys) != shard.num_samples or (texts is not None) != info.captions:
            has = f"{'captions' if texts is not None else 'no captions'}"
            raise ShardFormatError(
                f"{location.display(shard.name)} holds {len(keys)} keys and {has}, but index.json gives it "
                f"{shard.num_samples} samples and {'captions' if info.captions else 'no captions'}; re-ingest"
            )
        pairs += zip(keys, texts or [None] * len(keys), strict=True)
    return pairs
