"""What every loader shares: the rank's slice, the shard tables, the corrupt-shard policy, the epoch plan, state.

The plan of an epoch is a pure function of (seed, epoch, rank) and of which shards are readable: the rank's
samples as (shard, sample) pairs in stream order, and the order in which they are batched. How the samples are
then read (in this process or in worker processes, on the CPU or the GPU) cannot change a batch. The subclasses
(`resident.py`, `streamed.py`; `latents.py` for latent shards, through the format seams `_read_index`,
`_table_of` and `repair`) say how; this module knows none of them (`factory.py` picks one).
"""

from __future__ import annotations

import logging
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np
import torch

from pipeline import augment
from pipeline.errors import ShardFormatError
from pipeline.layouts import Layout, ShardTable, get_layout
from pipeline.loader.corrupt import CORRUPTION, CorruptShardError, OnCorrupt
from pipeline.shards import check_shard, read_index
from pipeline.storage import Location

Crop = Literal["random", "centre"]
DecodeDevice = Literal["cpu", "device"]
log = logging.getLogger("pipeline.loader")


@dataclass(frozen=True, slots=True)
class Batch:
    # uint8 (B, C, H, W). From the CPU paths the memory is channels-last ((B, H, W, C) contiguous, as decoders and
    # shards hold pixels): reordering it is left to the consumer's cast to float
    # (`vae.objectives.inputs.to_input`), free on a GPU. Index it by shape; call .contiguous() where planar memory is
    # needed.
    images: torch.Tensor
    labels: torch.Tensor | None  # int64 (B,)
    factors: torch.Tensor | None = None  # float32 (B, K): ground-truth factors, when the source has them


@dataclass
class Plan:
    """One epoch of one rank: its samples in stream order, and the order in which they are batched."""

    shards: np.ndarray  # int64 (n,): shard of each stream position
    samples: np.ndarray  # int64 (n,): sample within that shard
    order: np.ndarray  # int64 (n,): stream positions in batching order (permuted within windows)
    window: int  # samples per shuffle window, a multiple of the batch size: no batch spans two windows


def _slice_ranges(start: int, stop: int, total: int) -> list[tuple[int, int]]:
    """[start, stop) in a stream of `total` samples that wraps around, as non-wrapping ranges."""
    ranges = []
    while start < stop:
        lo = start % total
        hi = min(total, lo + (stop - start))
        ranges.append((lo, hi))
        start += hi - lo
    return ranges


def generator(*seed: int) -> torch.Generator:
    """A CPU torch generator seeded from a tuple, as numpy's default_rng(list) is."""
    return torch.Generator().manual_seed(int(np.random.default_rng(list(seed)).integers(1 << 62)))


def rank_slice(num_samples: int, rank: int, world_size: int, pad: bool) -> tuple[int, int]:
    """[start, stop) of the rank's samples in the epoch's stream. pad=True: ceil(N / world) each, the last slice
    running past N (the stream wraps); pad=False: exactly [r * N // world, (r + 1) * N // world)."""
    if pad:
        per_rank = math.ceil(num_samples / world_size)
        return rank * per_rank, (rank + 1) * per_rank
    return rank * num_samples // world_size, (rank + 1) * num_samples // world_size


def _check_arguments(batch_size: int, rank: int, world_size: int, on_corrupt: str, workers: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if on_corrupt not in ("fail", "skip"):
        raise ValueError(f"on_corrupt must be 'fail' or 'skip', got {on_corrupt!r}")
    if workers < 0:
        raise ValueError(f"workers must be 0 or more, got {workers}")


class ShardLoader(ABC):
    """Iterates one split of a shard directory for one rank, yielding `Batch`es.

    The common type of `ResidentLoader` (the split decoded once onto `device`) and `StreamedLoader` (read shard
    by shard each epoch), which behave the same; `open_loader` builds the one that fits.

    pad=True (training): every rank reads ceil(N / world) samples, so batch counts are equal.
    pad=False (evaluation): rank r reads exactly [r * N // world, (r + 1) * N // world).
    verify: check each shard's sha256 against index.json before its first read (reads every shard twice).
    on_corrupt: 'fail' raises CorruptShardError at an unreadable shard; 'skip' warns, records it in
    `skipped_shards` (name -> why) and reads on, padding the slice so the batch count does not change.
    workers: processes that read and decode (layouts that decode, e.g. JPEG shards); 0 reads in this process.
    decode_device: 'cpu' decodes in the workers; 'device' decodes JPEG batches on `device` (nvJPEG on a GPU).
    crop_size, crop, flip: cut each image to crop_size (H, W) at a random ('random') or central ('centre')
    place, mirrored at random when `flip`; seeded by (seed, epoch, rank, batch), so resume stays exact.
    """

    def __init__(
        self, shard_dir: str | os.PathLike, split: str, batch_size: int, *,
        rank: int = 0, world_size: int = 1, seed: int = 0,
        shuffle: bool = True, drop_last: bool = True, pad: bool = True, shuffle_buffer: int = 65536,
        device: torch.device | str | None = None, storage_options: dict | None = None,
        verify: bool = False, on_corrupt: OnCorrupt = "fail", workers: int = 0, decode_device: DecodeDevice = "cpu",
        crop_size: tuple[int, int] | None = None, crop: Crop = "random", flip: bool = False,
    ) -> None:
        _check_arguments(batch_size, rank, world_size, on_corrupt, workers)
        self.location, self.shard_dir = Location(shard_dir, storage_options), shard_dir
        self.index = self._read_index()
        self.split, self.batch_size, self.rank, self.world_size = split, batch_size, rank, world_size
        self.seed, self.shuffle, self.drop_last, self.pad = seed, shuffle, drop_last, pad
        self.shuffle_buffer = max(shuffle_buffer, batch_size)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.verify, self.on_corrupt, self.workers, self.decode_device = verify, on_corrupt, workers, decode_device
        self.crop_size, self.crop, self.flip = self._checked_crop(crop_size), crop, flip
        info = self.index.split(split)
        self.names, self.infos = [s.name for s in info.shards], info.shards
        self.counts = np.array([s.num_samples for s in info.shards], dtype=np.int64)
        self.num_samples = int(self.counts.sum())
        self.has_labels, self.has_factors = info.num_classes is not None, info.num_factors is not None
        self.start, self.stop = rank_slice(self.num_samples, rank, world_size, pad)
        if drop_last and self.stop - self.start < batch_size:
            raise ShardFormatError(
                f"split {split!r} has {self.num_samples} samples: fewer than one batch of {batch_size} for each of "
                f"{world_size} rank(s); lower the batch size or add data"
            )
        self.skipped_shards: dict[str, str] = {}  # shard name -> why it was skipped (on_corrupt='skip')
        self._tables: dict[int, ShardTable | None] = {}
        self.epoch = 0
        self.position = 0  # batches of this epoch already handed out
        self._skip = 0  # batches to pass over at the next iteration (a resumed mid-epoch position)

    # ---- the shard format: image shards here; the latent loader (`latents.py`) reads latent shards instead

    def _read_index(self):
        """The directory's index (ShardIndex), refused when missing, incomplete or of another format."""
        return read_index(self.location)

    @cached_property
    def layout(self) -> Layout:
        return get_layout(self.index.layout)

    def _table_of(self, f, name: str) -> ShardTable:
        """An open shard's table, from its headers (the layout's scan)."""
        return self.layout.table(f, name, self.index.image_shape)

    def _checked_crop(self, crop_size: tuple[int, int] | None) -> tuple[int, int] | None:
        h, w, _ = self.index.image_shape
        if crop_size is not None and (crop_size[0] > h or crop_size[1] > w):
            raise ValueError(f"crop size {tuple(crop_size)} is larger than the images ({h}, {w}); lower "
                             "data.crop_size")
        return None if crop_size is None else tuple(crop_size)

    resident = False  # ResidentLoader says True
    # the fix a corrupt-shard message gives: the writer of the directory rewrites the bad shard
    repair = "Check the directory with `vaepipe verify {location}` and re-run the ingest (intact shard groups are kept)"

    # ---- state

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order to use (call before iterating, on every rank); setting the epoch a
        restored position belongs to keeps that position, any other epoch starts at 0."""
        if epoch != self.epoch:
            self._skip = self.position = 0
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        """Where this rank stands: the epoch and how many of its batches were consumed."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue at `state`: the next iteration yields that epoch's batches from `position` on."""
        self.epoch, self._skip = int(state["epoch"]), int(state["position"])
        self.position = self._skip

    @property
    def nbytes(self) -> int:
        """Bytes of the split's decoded images (uint8)."""
        return self.num_samples * int(np.prod(self.index.image_shape))

    @property
    def samples_per_rank(self) -> int:
        return self.stop - self.start

    def __len__(self) -> int:
        n = self.samples_per_rank
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the batches' images, after any crop."""
        h, w, c = self.index.image_shape
        return (c, *(self.crop_size or (h, w)))

    def __iter__(self) -> Iterator[Batch]:
        skip, self._skip = self._skip, 0
        self.position = skip
        for index, batch in self._batches(skip):
            self.position = index + 1  # counted when handed out: a checkpoint taken now must not repeat it
            yield batch

    @abstractmethod
    def _batches(self, skip: int) -> Iterator[tuple[int, Batch]]:
        """(batch number, batch) of this epoch from batch `skip` on."""

    # ---- augmentation

    def _crop_params(self, batch: int, n: int) -> np.ndarray | None:
        """This batch's crop/flip parameters, a function of (seed, epoch, rank, batch) alone."""
        if self.crop_size is None and not self.flip:
            return None
        h, w, _ = self.index.image_shape
        size = self.crop_size or (h, w)
        if self.crop == "centre":
            return augment.centre(n, h, w, size)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, batch, 2])
        return augment.draw(rng, n, h, w, size, self.flip)

    def _augment(self, images: torch.Tensor, params: np.ndarray | None) -> torch.Tensor:
        if params is None:
            return images
        h, w, _ = self.index.image_shape
        return augment.crop_flip(images, params, self.crop_size or (h, w))

    # ---- shards

    def table(self, shard: int) -> ShardTable | None:
        """The shard's table (checked against index.json), or None when it is corrupt and skipped."""
        if shard not in self._tables:
            try:
                self._tables[shard] = self._scan(shard)
            except CORRUPTION as err:
                self.corrupt(self.names[shard], err)
                self._tables[shard] = None
        return self._tables[shard]

    def _scan(self, shard: int) -> ShardTable:
        name = self.names[shard]
        if self.verify:
            problem = check_shard(self.location, self.infos[shard])
            if problem:
                raise ShardFormatError(f"does not match index.json ({problem})")
        with self.location.open(name) as f:
            table = self._table_of(f, name)
        for what, promised, value in (("labels", self.has_labels, table.labels),
                                      ("factors", self.has_factors, table.factors)):
            if promised and value is None:
                raise ShardFormatError(f"holds a block without {what}, but index.json says split {self.split!r} "
                                       f"has {what}")
        if len(table) != self.counts[shard]:
            raise ShardFormatError(f"holds {len(table)} samples but index.json says {self.counts[shard]}")
        return table

    def corrupt(self, name: str, err: BaseException | str) -> None:
        """Apply the on_corrupt policy to a shard that failed to read: raise, or warn and record it."""
        path = self.location.display(name)
        if isinstance(err, str):
            reason = err
        else:  # our own checks say what is wrong as a predicate ("holds 8 samples but ..."); anything else is quoted
            reason = str(err) if type(err) is ShardFormatError else f"could not be read ({type(err).__name__}: {err})"
        if self.on_corrupt == "fail":
            raise CorruptShardError(
                f"{path} {reason}: the shard is corrupt. {self.repair.format(location=self.location)}, or set "
                "data.on_corrupt_shard skip to train without the shard"
            ) from (err if isinstance(err, BaseException) else None)
        if name not in self.skipped_shards:
            self.skipped_shards[name] = reason
            log.warning("skipping corrupt shard %s: it %s (data.on_corrupt_shard is 'skip'); to repair: %s", path,
                        reason, self.repair.format(location=self.location))

    # ---- the plan

    def _shard_order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.names))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.names))

    def _segments(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """(shard, first, last) sample ranges of the stream range [start, stop) this epoch, in stream order; the
        range may run past the end of the stream and wrap."""
        order = self._shard_order()
        starts = np.concatenate([[0], np.cumsum(self.counts[order])])  # global offset of each shard in the stream
        segments = []
        for lo, hi in _slice_ranges(start, stop, self.num_samples):
            for pos in range(len(order)):
                a, b = max(lo, starts[pos]), min(hi, starts[pos + 1])
                if a < b:
                    segments.append((int(order[pos]), int(a - starts[pos]), int(b - starts[pos])))
        return segments

    def readable_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(shard, sample) of every sample of the readable shards, in file order: what a resident load reads."""
        readable = [s for s in range(len(self.names)) if self.table(s) is not None]
        if not readable:
            raise ShardFormatError(f"{self.location}: no readable shard in split {self.split!r} (skipped: "
                                   f"{sorted(self.skipped_shards)}). {self.repair.format(location=self.location)}")
        return (np.concatenate([np.full(self.counts[s], s, np.int64) for s in readable]),
                np.concatenate([np.arange(self.counts[s], dtype=np.int64) for s in readable]))

    def stream(self) -> tuple[np.ndarray, np.ndarray]:
        """This rank's (shard, sample) pairs in stream order. Samples of skipped shards are made up, when padding,
        from the stream past the slice's end (wrapping, as the padding of the last slice does), so the rank's
        sample count, and with it its batch count, stays what every other rank expects (the ranks never talk)."""
        shards, samples = [], []
        missing = self._take(self._segments(self.start, self.stop), shards, samples)
        cursor = self.stop
        while missing and self.pad:
            if cursor - self.stop >= self.num_samples:
                raise ShardFormatError(f"{self.location}: no readable shard is left in split {self.split!r} "
                                       f"(skipped: {sorted(self.skipped_shards)}). "
                                       f"{self.repair.format(location=self.location)}")
            want, missing = missing, 0
            missing = self._take(self._segments(cursor, cursor + want), shards, samples)
            cursor += want
        if not shards:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(shards), np.concatenate(samples)

    def _take(self, segments, shards: list, samples: list) -> int:
        """Append the readable segments' samples; return how many were in skipped shards."""
        missing = 0
        for shard, first, last in segments:
            if self.table(shard) is None:
                missing += last - first
                continue
            shards.append(np.full(last - first, shard, np.int64))
            samples.append(np.arange(first, last, dtype=np.int64))
        return missing

    def plan(self) -> Plan:
        """This epoch's plan: the stream, cut into windows of whole batches, each window permuted."""
        shards, samples = self.stream()
        n = len(shards)
        window = math.ceil(self.shuffle_buffer / self.batch_size) * self.batch_size
        if not self.shuffle:
            return Plan(shards, samples, np.arange(n), window)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, 1])
        order = np.concatenate([lo + rng.permutation(min(window, n - lo)) for lo in range(0, n, window)] or
                               [np.zeros(0, np.int64)])
        return Plan(shards, samples, order.astype(np.int64), window)

    def batch_count(self, n: int) -> int:
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def extras(self, shards: np.ndarray, samples: np.ndarray) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Labels and factors of the given samples, from the shard tables."""
        def gather(attr: str, wanted: bool, dtype):
            if not wanted:
                return None
            out = None
            for shard in np.unique(shards).tolist():  # one fancy-index per shard in the batch, no per-sample Python
                mine = shards == shard
                values = getattr(self._tables[shard], attr)[samples[mine]]
                if out is None:
                    out = np.empty((len(shards), *values.shape[1:]), dtype)
                out[mine] = values
            return torch.from_numpy(np.zeros(0, dtype) if out is None else out)

        return gather("labels", self.has_labels, np.int64), gather("factors", self.has_factors, np.float32)

