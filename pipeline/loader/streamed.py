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
from pipeline.loader.read import BatchJobs, BatchPool, Reader, decode_batch


class StreamedLoader(ShardLoader):
    _pool: BatchPool | None = None  # decoded batches' buffers when decoding in this process (workers=0)

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
        positions = [plan.order[b * self.batch_size : (b + 1) * self.batch_size] for b in range(count)]
        raw = self.decode_device == "device"
        jobs = BatchJobs(
            reader, [(plan.shards[p], plan.samples[p]) for p in positions],
            [None if raw else self._crop_params(b, len(p)) for b, p in enumerate(positions)],
            self.crop_size, skip=self.on_corrupt == "skip", raw=raw, pool=None if self.workers else self._batch_pool(),
        )
        batches = range(skip, count)
        if self.workers:
            results = DataLoader(jobs, batch_size=None, sampler=batches, num_workers=self.workers,
                                 pin_memory=self.device.type == "cuda", prefetch_factor=4)
        else:
            results = (jobs[b] for b in batches)
        for result in results:
            b = result["index"]
            for name, reason in result.get("error", {}).items():
                self.corrupt(name, reason)  # raises under 'fail'
            if "error" in result:
                raise ShardFormatError(f"{self.location}: no image of batch {b} could be read "
                                       f"({sorted(result['error'])}); re-run the ingest")
            for name, reason in result.get("skipped", {}).items():
                self.corrupt(name, reason)
            if raw:
                images = decode_batch(result["raw"], self.index.image_shape[2], self.device)
                images = self._augment(images, self._crop_params(b, len(images)))
            else:
                images = result["images"]
            labels, factors = self.extras(plan.shards[positions[b]], plan.samples[positions[b]])
            yield b, Batch(images, labels, factors)

    def _batch_pool(self) -> BatchPool:
        if self._pool is None:
            self._pool = BatchPool()
        return self._pool


def _chw(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, C) -> (B, C, H, W). A channels-last view would be free, but its strides leak into the conv
    weight gradients and DDP warns that they do not match its buckets; one uint8 copy per batch is cheap."""
    b, h, w, c = images.shape
    tensor = torch.from_numpy(images)
    return tensor.reshape(b, 1, h, w) if c == 1 else tensor.permute(0, 3, 1, 2).contiguous()
