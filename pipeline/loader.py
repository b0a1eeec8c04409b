"""Per-rank loader over a shard directory: every rank gets the same number of batches per epoch.

Each epoch the shard order is permuted with a seed shared by all ranks, the shards are laid end to end as
one global sample stream, and rank r reads the contiguous slice [r * n, (r + 1) * n) with n = ceil(N / world),
wrapping to the start for the last few (as torch's DistributedSampler pads). So the ranks read disjoint data
that together cover the split, their batch counts are equal whatever the shard sizes (plain `split_by_node`
on uneven shards makes ranks disagree on step counts and DDP hangs), and a rank opens only the shards that
overlap its slice. Samples are then shuffled within the rank through a buffer.

The loader never goes through `accelerator.prepare()`: that would make rank 0 read every batch and scatter it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from pipeline.errors import ShardFormatError
from pipeline.shards import read_index


@dataclass(frozen=True, slots=True)
class Batch:
    images: torch.Tensor  # uint8 (B, C, H, W), contiguous
    labels: torch.Tensor | None  # int64 (B,)


def _blocks(url: str) -> Iterator[dict]:
    """Decoded blocks of one shard, in file order."""
    pipeline = wds.DataPipeline(
        wds.SimpleShardList([url]), wds.tarfile_to_samples(handler=wds.reraise_exception), wds.decode()
    )
    yield from pipeline


def _slice_ranges(start: int, stop: int, total: int) -> list[tuple[int, int]]:
    """[start, stop) in a stream of `total` samples that wraps around, as non-wrapping ranges."""
    ranges = []
    while start < stop:
        lo = start % total
        hi = min(total, lo + (stop - start))
        ranges.append((lo, hi))
        start += hi - lo
    return ranges


class ShardLoader:
    """Iterates one split of a shard directory for one rank, yielding `Batch`es.

    pad=True (training): every rank reads ceil(N / world) samples, so batch counts are equal.
    pad=False (evaluation): rank r reads exactly [r * N // world, (r + 1) * N // world); counts may differ by
    one batch, which is fine when evaluation runs no collective per batch.
    """

    def __init__(
        self,
        shard_dir: str | os.PathLike,
        split: str,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        pad: bool = True,
        shuffle_buffer: int = 65536,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.shard_dir = Path(shard_dir)
        self.index = read_index(self.shard_dir)
        info = self.index.split(split)
        self.split, self.batch_size, self.rank, self.world_size = split, batch_size, rank, world_size
        self.seed, self.shuffle, self.drop_last, self.pad = seed, shuffle, drop_last, pad
        self.shuffle_buffer = max(shuffle_buffer, batch_size)
        self.urls = [str(self.shard_dir / s.name) for s in info.shards]
        self.counts = np.array([s.num_samples for s in info.shards], dtype=np.int64)
        self.num_samples = int(self.counts.sum())
        self.has_labels = info.num_classes is not None
        if pad:
            per_rank = math.ceil(self.num_samples / world_size)
            self.start, self.stop = rank * per_rank, (rank + 1) * per_rank
        else:
            self.start = rank * self.num_samples // world_size
            self.stop = (rank + 1) * self.num_samples // world_size
        if drop_last and self.stop - self.start < batch_size:
            raise ShardFormatError(
                f"split {split!r} has {self.num_samples} samples: fewer than one batch of {batch_size} for each of "
                f"{world_size} rank(s); lower the batch size or add data"
            )
        self.epoch = 0
        self.position = 0  # batches of this epoch already handed out
        self._skip = 0  # batches to pass over at the next iteration (a resumed mid-epoch position)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shard order and shuffle to use (call before iterating, on every rank).

        Setting the epoch a restored position belongs to keeps that position; any other epoch starts at 0.
        """
        if epoch != self.epoch:
            self._skip = self.position = 0
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        """Where this rank stands: the epoch and how many of its batches were consumed."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue at `state`: the next iteration yields that epoch's batches from `position` on, so a resumed
        run neither repeats nor skips a sample (the order is a pure function of seed, epoch and rank)."""
        self.epoch, self._skip = int(state["epoch"]), int(state["position"])
        self.position = self._skip

    @property
    def samples_per_rank(self) -> int:
        return self.stop - self.start

    def __len__(self) -> int:
        n = self.samples_per_rank
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _segments(self) -> list[tuple[int, int, int]]:
        """(shard index, first, last) local sample ranges this rank reads this epoch, in stream order."""
        order = (
            np.random.default_rng([self.seed, self.epoch]).permutation(len(self.urls))
            if self.shuffle
            else np.arange(len(self.urls))
        )
        starts = np.concatenate([[0], np.cumsum(self.counts[order])])  # global offset of each shard in the stream
        segments = []
        for lo, hi in _slice_ranges(self.start, self.stop, self.num_samples):
            for pos in range(len(order)):
                a, b = max(lo, starts[pos]), min(hi, starts[pos + 1])
                if a < b:
                    segments.append((int(order[pos]), int(a - starts[pos]), int(b - starts[pos])))
        return segments

    def _chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """The rank's samples as (images, labels) array chunks, block by block."""
        for shard, first, last in self._segments():
            offset = 0
            for block in _blocks(self.urls[shard]):
                images = block["images.npy"]
                a, b = max(first, offset), min(last, offset + len(images))
                if a < b:
                    labels = block["labels.npy"][a - offset : b - offset] if self.has_labels else None
                    yield images[a - offset : b - offset], labels
                offset += len(images)
                if offset >= last:
                    break
            if offset < last:
                raise ShardFormatError(
                    f"{self.urls[shard]} holds {offset} samples but index.json says at least {last}; "
                    "the shard is truncated or was replaced: re-run the ingest"
                )

    def _batches(self, images: np.ndarray, labels: np.ndarray | None) -> Iterator[Batch]:
        for i in range(0, len(images) - self.batch_size + 1, self.batch_size):
            end = i + self.batch_size
            yield self._batch(images[i:end], None if labels is None else labels[i:end])

    @staticmethod
    def _batch(images: np.ndarray, labels: np.ndarray | None) -> Batch:
        # (B, H, W, C) -> (B, C, H, W). A channels-last view would be free, but its strides leak into the conv
        # weight gradients and DDP warns that they do not match its buckets; one uint8 copy per batch is cheap.
        b, h, w, c = images.shape
        tensor = torch.from_numpy(images)
        tensor = tensor.reshape(b, 1, h, w) if c == 1 else tensor.permute(0, 3, 1, 2).contiguous()
        return Batch(tensor, None if labels is None else torch.from_numpy(labels))

    def __iter__(self) -> Iterator[Batch]:
        skip, self._skip = self._skip, 0
        self.position = skip
        for index, batch in enumerate(self._epoch_batches()):
            if index >= skip:
                self.position = index + 1  # counted when handed out: a checkpoint taken now must not repeat it
                yield batch

    def _epoch_batches(self) -> Iterator[Batch]:
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, 1])
        buffer: list[tuple[np.ndarray, np.ndarray | None]] = []
        buffered = 0
        for chunk in self._chunks():
            buffer.append(chunk)
            buffered += len(chunk[0])
            if buffered < self.shuffle_buffer:
                continue
            images, labels = self._merge(buffer, rng)
            usable = len(images) - len(images) % self.batch_size
            yield from self._batches(images[:usable], None if labels is None else labels[:usable])
            buffer = [(images[usable:], None if labels is None else labels[usable:])]
            buffered = len(images) - usable
        if buffered:
            images, labels = self._merge(buffer, rng)
            yield from self._batches(images, labels)
            rest = len(images) % self.batch_size
            if rest and not self.drop_last:
                yield self._batch(images[-rest:], None if labels is None else labels[-rest:])

    def _merge(self, buffer, rng) -> tuple[np.ndarray, np.ndarray | None]:
        images = np.concatenate([c[0] for c in buffer])
        labels = np.concatenate([c[1] for c in buffer]) if self.has_labels else None
        if self.shuffle:
            perm = rng.permutation(len(images))
            images, labels = images[perm], None if labels is None else labels[perm]
        return images, labels


def read_split(shard_dir: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    """A whole split in file order: uint8 images (N, H, W, C) and labels (N,) or None. For evaluation and plots."""
    loader = ShardLoader(shard_dir, split, batch_size=1, shuffle=False, drop_last=False, pad=False)
    chunks = list(loader._chunks())
    images = np.concatenate([c[0] for c in chunks])
    labels = np.concatenate([c[1] for c in chunks]) if loader.has_labels else None
    return images, labels
