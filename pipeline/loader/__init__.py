"""Per-rank loader over a shard directory: every rank gets the same number of batches per epoch.

Each epoch the order is a pure function of (seed, epoch, rank), so a saved position resumes exactly, whatever
the number of worker processes.

Streaming (`streamed.py`): the shard order is permuted with a seed shared by all ranks, the shards are laid end
to end as one global sample stream, and rank r reads the contiguous slice [r * n, (r + 1) * n) with
n = ceil(N / world), wrapping to the start for the last few (as torch's DistributedSampler pads). So the ranks
read disjoint data that together cover the split, their batch counts are equal whatever the shard sizes (plain
`split_by_node` on uneven shards makes ranks disagree on step counts and DDP hangs), and a rank opens only the
shards that overlap its slice. Within a rank, windows of whole batches (`shuffle_buffer` samples, rounded up)
are permuted and each batch gathered from its window by index.

Resident (`resident.py`, the split fits `memory_budget`): the split is decoded once into a uint8 tensor on the
device, and each epoch a permutation shared by all ranks is cut into the same per-rank slices.

Corrupt shards (a garbled or truncated tar member, a sha256 mismatch under `verify`, an undecodable block or
image) follow `on_corrupt`: 'fail' raises `CorruptShardError` naming the shard and the fix; 'skip' logs a
warning, records the shard in `skipped_shards` and reads on. A shard's table (tar and array headers) is checked
before any of its samples is used, so a skipped shard contributes nothing, and the rank pads its slice by
reading on past its end (samples of other slices, wrapping to the start): training repeats a few samples
instead of losing a step on one rank, which would hang DDP. An image that fails to decode in a worker is
replaced by another image of its batch. Evaluation (pad=False) does not pad.

The loader never goes through `accelerator.prepare()`: that would make rank 0 read every batch and scatter it.
"""

from __future__ import annotations

import os

from pipeline.loader.base import CORRUPTION, Batch, CorruptShardError, OnCorrupt, Resident, ShardLoader
from pipeline.loader.resident import ResidentLoader, read_whole
from pipeline.loader.streamed import StreamedLoader

__all__ = ["CORRUPTION", "Batch", "CorruptShardError", "OnCorrupt", "Resident", "ResidentLoader", "ShardLoader",
           "StreamedLoader", "read_split"]


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
