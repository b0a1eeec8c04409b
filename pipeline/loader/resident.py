"""Resident loading: the split is decoded once into a uint8 tensor on the device (N, C, H, W); each epoch a
permutation shared by all ranks is cut into the same per-rank slices as streaming: disjoint, equal in count,
and on a GPU no host work per batch at all. The epoch's order is drawn at once; the batches are gathered one
at a time on a CPU and several at a time on CUDA (`gather_for`), the same batches either way; crops and flips
run on the device."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline.errors import ShardFormatError
from pipeline.loader.base import Batch, ShardLoader, generator
from pipeline.loader.read import BatchJobs, Reader

DECODE_CHUNK = 256  # images a worker decodes per job while the split is loaded
GATHER_BYTES = 256 << 20  # device memory for the batches the block gather takes at once (at least one batch)

Gather = Literal["batch", "block"]
Tensors = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]  # images, labels, factors


def gather_for(device: torch.device) -> Gather:
    """The gather a device's batches use. A CPU gets one index_select per batch: the block gather measured
    slower there (bench/LOG.md, 2026-12-07; MNIST at batch 256: 0.36-0.40x with one thread, 0.81x on the quiet
    2-core box): its fresh epoch-sized tensor costs more in page faults (an MNIST epoch: 11,485 faults, 40 ms,
    against 12 ms for the 234 small gathers) than the calls it saves. Only a box loaded past its cores, where
    each small call waits on the thread pool, turned that round. CUDA gets the block gather by design, to save
    the two or three kernel launches of each batch's gather: not yet measured on a GPU here. Other devices get
    the per-batch gather, the plain one."""
    return "block" if device.type == "cuda" else "batch"


class ResidentLoader(ShardLoader):
    """Decodes the split once onto the device and cuts each epoch from it (see the module docstring)."""

    resident = True
    _data: Tensors | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gather: Gather = gather_for(self.device)  # tests and bench/resident_gather.py set the other one

    def load(self) -> Tensors:
        """The whole split, decoded once, in file order, on the device (N excludes skipped shards' samples)."""
        if self._data is None:
            images, labels, factors = read_whole(self)
            self._data = (images.to(self.device),
                          None if labels is None else labels.to(self.device),
                          None if factors is None else factors.to(self.device))
        return self._data

    def _batches(self, skip: int) -> Iterator[tuple[int, Batch]]:
        data = self.load()
        order = self.epoch_order()
        count = self.batch_count(len(order))
        for b, (images, labels, factors) in GATHERS[self.gather](data, order, self.batch_size, count, skip):
            yield b, Batch(self._augment(images, self._crop_params(b, len(images))), labels, factors)

    def epoch_order(self) -> torch.Tensor:
        """This rank's sample indices for the epoch, in batching order, on the device: drawn on the host from
        (seed, epoch[, rank]) all at once before the first batch, and moved there in one copy."""
        n = len(self.load()[0])  # the slice bounds stay those of index.json's count: skipping changes no rank's length
        if self.shuffle:  # the same permutation on every rank (seed, epoch): the rank slices stay disjoint
            perm = torch.randperm(n, generator=generator(self.seed, self.epoch))
        else:
            perm = torch.arange(n)
        if self.pad:  # the padded slice wraps like the streamed one
            positions = torch.arange(self.start, self.stop) % n
        else:  # an exact slice of what was read
            positions = torch.arange(self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size)
        mine = perm[positions]
        if self.shuffle:  # and a within-rank order of its own, as in streaming mode
            mine = mine[torch.randperm(len(mine), generator=generator(self.seed, self.epoch, self.rank, 1))]
        if self.device.type == "cuda":  # from pinned memory the copy does not wait for the device's queue
            return mine.pin_memory().to(self.device, non_blocking=True)
        return mine.to(self.device)


def take(data: Tensors, idx: torch.Tensor) -> Tensors:
    """The rows `idx` of images, labels and factors; images stay channels-last in memory (rows of (H, W, C))."""
    images, labels, factors = data
    return (images.permute(0, 2, 3, 1).index_select(0, idx).permute(0, 3, 1, 2),
            None if labels is None else labels.index_select(0, idx),
            None if factors is None else factors.index_select(0, idx))


def per_batch(data: Tensors, order: torch.Tensor, size: int, count: int, skip: int) -> Iterator[tuple[int, Tensors]]:
    """Batches `skip` to `count` of the epoch's `order`, one gather each (an index_select per tensor)."""
    for b in range(skip, count):
        yield b, take(data, order[b * size : (b + 1) * size])


def blocks(data: Tensors, order: torch.Tensor, size: int, count: int, skip: int) -> Iterator[tuple[int, Tensors]]:
    """The same batches, several per gather (GATHER_BYTES of images: all of an MNIST epoch at batch 16,384): a
    batch is then a view, with no gather, no index slice and no kernel launch of its own on the hot path."""
    images = data[0]
    per_batch_bytes = max(1, images[:1].numel() * images.element_size() * size)
    chunk = max(1, GATHER_BYTES // per_batch_bytes)
    for first in range(skip, count, chunk):
        last = min(first + chunk, count)
        block = take(data, order[first * size : last * size])
        for b in range(first, last):
            part = slice((b - first) * size, (b - first + 1) * size)
            yield b, tuple(None if t is None else t[part] for t in block)


GATHERS: dict[Gather, Callable[..., Iterator[tuple[int, Tensors]]]] = {"batch": per_batch, "block": blocks}


def read_whole(loader: ShardLoader) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Every readable shard of the loader's split in file order, as uint8 (N, C, H, W) on the CPU, channels-last
    in memory (`Batch`), with labels and factors; packed pixels are copied straight from the files, other
    layouts decoded by the workers."""
    shards, samples = loader.readable_rows()
    reader = Reader(loader.location, loader.names, loader._tables, loader.layout, loader.index.image_shape)
    try:
        if loader.layout.decodes:
            images = _decoded(loader, reader, shards, samples)
        else:
            shape = loader.index.image_shape
            buffer = np.empty((len(shards), *shape), np.uint8)
            reader.contiguous(shards, samples, memoryview(buffer.reshape(-1)), int(np.prod(shape)))
            images = torch.from_numpy(buffer).permute(0, 3, 1, 2)
    finally:
        reader.close()
    labels, factors = loader.extras(shards, samples)
    return images, labels, factors


def _decoded(loader: ShardLoader, reader: Reader, shards: np.ndarray, samples: np.ndarray) -> torch.Tensor:
    """The samples decoded in chunks of DECODE_CHUNK (by the loader's workers, when it has them), in order."""
    chunks = [(shards[i : i + DECODE_CHUNK], samples[i : i + DECODE_CHUNK]) for i in range(0, len(shards),
                                                                                           DECODE_CHUNK)]
    jobs = BatchJobs(reader, chunks, [None] * len(chunks), None, skip=False)
    results = (DataLoader(jobs, batch_size=None, num_workers=loader.workers) if loader.workers
               else (jobs[i] for i in range(len(jobs))))
    out = []
    for result in results:
        for name, reason in result.unreadable.items():
            loader.corrupt(name, reason)  # raises under 'fail'
        if result.failed:  # under 'skip' a whole shard's samples would have to go; refuse rather than guess
            raise ShardFormatError(f"{loader.location}: images of {sorted(result.unreadable)} cannot be decoded; "
                                   "re-run the ingest, or train streamed (data.resident off) to skip them")
        out.append(result.images)
    return torch.cat([images.permute(0, 2, 3, 1) for images in out]).permute(0, 3, 1, 2)  # stays channels-last
