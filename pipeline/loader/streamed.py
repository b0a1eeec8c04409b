"""Streamed loading: each epoch the rank reads its slice of the shards again.

Packed shards in this process: the pixels of a window of samples are copied straight from the files into one
buffer (`readinto`), and each batch is gathered from it by index; this reads >1M MNIST samples/s per core.
Layouts that decode (JPEG, PNG) go through torch's DataLoader: batch i of the plan is read and decoded in a
worker process, so decoding runs on `workers` cores, never on the training process's thread, and pinned
memory makes the copy to the GPU asynchronous. The plan, not the workers, decides every batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline.errors import ShardFormatError
from pipeline.loader.base import Batch, Plan, ShardLoader
from pipeline.loader.read import BatchJobs, BatchPool, BatchResult, Reader, decode_batch

PREFETCH = 4  # batches each worker works ahead of the consumer


class StreamedLoader(ShardLoader):
    """Reads the rank's slice of the shards again each epoch (see the module docstring)."""

    _pool: BatchPool | None = None  # decoded batches' buffers, reused across epochs

    def _batches(self, skip: int) -> Iterator[tuple[int, Batch]]:
        plan = self.plan()
        count = self.batch_count(len(plan.order))
        reader = Reader(self.location, self.names, self._tables, self.layout, self.index.image_shape)
        try:
            if self.layout.decodes:  # packed pixels are read fastest here: a worker would only add a copy
                yield from self._decoded(plan, count, skip, reader)
            else:
                yield from self._windows(plan, count, skip, reader)
        finally:
            reader.close()

    def _windows(self, plan: Plan, count: int, skip: int, reader: Reader) -> Iterator[tuple[int, Batch]]:
        """Packed pixels, window by window: read a window's samples in stream order into the buffer, then
        gather its batches by the plan's order. Windows of batches already consumed are not read."""
        shape = self.index.image_shape
        sample_bytes = int(np.prod(shape))
        per_window = plan.window // self.batch_size
        buffer = np.empty((plan.window, *shape), np.uint8)
        flat = memoryview(buffer.reshape(-1))
        for first in range(0, count, per_window):
            last = min(first + per_window, count)
            if last <= skip:
                continue
            lo = first * self.batch_size
            hi = min(lo + plan.window, len(plan.order))
            reader.contiguous(plan.shards[lo:hi], plan.samples[lo:hi], flat, sample_bytes)
            for b in range(max(first, skip), last):
                positions = plan.order[b * self.batch_size : (b + 1) * self.batch_size]
                images = _chw(buffer[positions - lo])
                yield b, self._batch(images, plan, positions, b)

    def _batch(self, images: torch.Tensor, plan: Plan, positions: np.ndarray, b: int) -> Batch:
        labels, factors = self.extras(plan.shards[positions], plan.samples[positions])
        return Batch(self._augment(images, self._crop_params(b, len(images))), labels, factors)

    def _decoded(self, plan: Plan, count: int, skip: int, reader: Reader) -> Iterator[tuple[int, Batch]]:
        """Layouts that decode: batch b of the plan read and decoded by `BatchJobs`, in `workers` processes (or
        here, without), into buffers of the pool; under decode_device 'device' the workers only read, and the
        batch is decoded here on the device."""
        positions = [plan.order[b * self.batch_size : (b + 1) * self.batch_size] for b in range(count)]
        raw = self.decode_device == "device"
        # Workers feeding a GPU send fresh shared memory, which DataLoader's pin thread copies into pinned memory
        # beside the training thread; a pool buffer would have to be pinned on the training thread (or be pinned
        # itself, and reused only once its copy to the device has finished): not measured on a GPU yet.
        pool = None if raw or (self.workers and self.device.type == "cuda") else self._batch_pool()
        jobs = BatchJobs(
            reader, [(plan.shards[p], plan.samples[p]) for p in positions],
            [None if raw else self._crop_params(b, len(p)) for b, p in enumerate(positions)],
            self.crop_size, skip=self.on_corrupt == "skip", raw=raw, pool=pool,
        )
        reserved: set[int] = set()  # buffers dispatched with this epoch's batches and not yet handed out
        results = self._results(jobs, range(skip, count), pool, reserved)
        try:
            for result in results:
                images = self._images(result, pool)
                reserved.discard(result.slot)
                mine = positions[result.index]
                yield result.index, Batch(images, *self.extras(plan.shards[mine], plan.samples[mine]))
        finally:
            # an epoch stopped early (an error, a consumer that breaks off): its workers are shut down with the
            # DataLoader's iterator, and only then are the buffers they might still write into given back
            del results
            for slot in reserved:
                pool.release(slot)

    def _results(self, jobs: BatchJobs, batches: range, pool: BatchPool | None,
                 reserved: set[int]) -> Iterator[BatchResult]:
        """The jobs' results for `batches`, in order: from the workers, or computed here when there are none."""
        if not self.workers:
            return (jobs[b] for b in batches)
        return iter(DataLoader(jobs, batch_size=None, sampler=_dispatch(batches, pool, reserved),
                               num_workers=self.workers, pin_memory=self.device.type == "cuda",
                               prefetch_factor=PREFETCH))

    def _images(self, result: BatchResult, pool: BatchPool | None) -> torch.Tensor:
        """The batch's images, uint8 (B, C, h, w), once the on_corrupt policy has seen its unreadable samples."""
        if result.slot is not None and result.shape is None:  # reserved for the batch, but not filled
            pool.release(result.slot)
        for name, reason in result.unreadable.items():
            self.corrupt(name, reason)  # raises under 'fail'
        if result.failed:
            raise ShardFormatError(f"{self.location}: no image of batch {result.index} could be read "
                                   f"({sorted(result.unreadable)}); re-run the ingest")
        if result.raw is not None:
            images = decode_batch(result.raw, self.index.image_shape[2], self.device)
            return self._augment(images, self._crop_params(result.index, len(images)))
        if result.shape is not None:
            return pool.wrap(result.slot, result.shape).permute(0, 3, 1, 2)
        return result.images

    def _batch_pool(self) -> BatchPool:
        """The decoded batches' buffers, kept across epochs (paged in once): in shared memory for workers, as
        many as can be in flight (prefetched per worker) plus the batch the consumer holds and the next."""
        size = self.workers * PREFETCH + 2 if self.workers else 3
        h, w, c = self.index.image_shape
        nbytes = self.batch_size * c * int(np.prod(self.crop_size or (h, w)))
        if self._pool is None or (len(self._pool.buffers), self._pool.nbytes) != (size, nbytes):
            self._pool = BatchPool(size, nbytes, shared=self.workers > 0)
        return self._pool


def _dispatch(batches: range, pool: BatchPool | None, reserved: set[int]) -> Iterator[tuple[int, int | None]]:
    """The DataLoader's sampler: (batch, buffer) pairs, drawn lazily as it sends work (prefetch_factor per worker
    ahead of the consumer), so a buffer is reserved when its batch is dispatched, from those the consumer has
    dropped by then; each is added to `reserved` until its batch is handed out."""
    for b in batches:
        slot = None if pool is None else pool.reserve(pool.nbytes)  # room for a whole batch
        if slot is not None:
            reserved.add(slot)
        yield b, slot


def _chw(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, C) -> (B, C, H, W) as a view: the pixels stay channels-last in memory, as every loader hands
    them out (`Batch`); the consumer's cast to float makes the model's layout (`vae.objectives.inputs.to_input`)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2)
