"""Reading samples by (shard, sample), in this process or in DataLoader worker processes.

`Reader` holds what a worker needs (the shard tables, the layout, the location) and keeps its own open files,
so each worker opens the shards it reads after the fork. `BatchJobs` is the map-style dataset torch's
`DataLoader` runs in its workers: item i is batch i of the epoch's plan, decoded (and cropped) in the worker, and
its answer a `BatchResult`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from pipeline.layouts import Layout, ShardTable, decode_tensor, load_decoders
from pipeline.loader.corrupt import CORRUPTION
from pipeline.storage import Location


class Reader:
    """Reads samples of readable shards (their tables are known) into uint8 (n, C, H, W) tensors."""

    def __init__(self, location: Location, names: list[str], tables: dict[int, ShardTable | None], layout: Layout,
                 image_shape: tuple[int, int, int]) -> None:
        self.location, self.names, self.tables = location, names, tables
        self.layout, self.image_shape = layout, tuple(image_shape)
        self._files: dict[int, Any] = {}
        if layout.decodes:  # made before any worker forks: they inherit the codecs instead of importing them
            load_decoders()

    def file(self, shard: int):
        if shard not in self._files:
            self._files[shard] = self.location.open(self.names[shard])
        return self._files[shard]

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def raw(self, shard: int, sample: int) -> bytes:
        table = self.tables[shard]
        f = self.file(shard)
        f.seek(int(table.offsets[sample]))
        data = f.read(int(table.sizes[sample]))
        if len(data) != table.sizes[sample]:
            raise EOFError(f"sample {sample} is cut off at the end of the file (truncated)")
        return data

    def contiguous(self, shards: np.ndarray, samples: np.ndarray, out: memoryview, sample_bytes: int) -> None:
        """Packed pixels of the given samples straight into `out` (HWC order), one `readinto` per run of
        consecutive samples of one shard: the only copy before the batch gather."""
        n = len(shards)
        offsets = np.empty(n, np.int64)
        for shard in np.unique(shards).tolist():
            mine = shards == shard
            offsets[mine] = self.tables[shard].offsets[samples[mine]]
        # a run: same shard, and each sample's pixels right after the previous one's (blocks are apart in the tar)
        breaks = np.flatnonzero((np.diff(shards) != 0) | (np.diff(offsets) != sample_bytes)) + 1
        for lo, hi in zip(np.concatenate([[0], breaks]), np.concatenate([breaks, [n]]), strict=True):
            shard = int(shards[lo])
            f = self.file(shard)
            f.seek(int(offsets[lo]))
            size = int(hi - lo) * sample_bytes
            if f.readinto(out[lo * sample_bytes : lo * sample_bytes + size]) != size:
                # each shard's size was checked when its table was built: the file changed under the reader
                raise EOFError(f"{self.names[shard]} shrank while it was read; is an ingest writing into it?")

    def decode(self, shard: int, sample: int) -> torch.Tensor:
        table = self.tables[shard]
        suffix = table.suffixes[sample] if table.suffixes else None
        return self.layout.decode(self.raw(shard, sample), suffix, self.image_shape)


class BatchPool:
    """Batch buffers that are filled again once nobody holds them, in this process or by the loader's workers.

    Filling a freshly allocated batch costs a page fault per 4 kB touched (and, in shared memory, a new mapping
    per batch): a 256-photo batch of 256 px is 50 MB, so the faults cost ~0.18 ms per photo, a quarter of its
    decode (bench/LOG.md, 2026-12-06). A worker cannot see when the training process drops a batch, so the
    consuming process owns the buffers: it reserves a free one for each batch as the batch is dispatched, the
    worker decodes into it, and the consumer wraps it as the batch's tensor. A buffer is a numpy array, handed
    out as `torch.from_numpy`: every tensor and view of it keeps the array alive, so the array's reference count
    says whether anything still uses it. torch exposes no public use count for a storage, hence this.

    shared=True puts the buffers in shared memory, made before the workers start (they inherit or unpickle
    them); a batch that finds every buffer held gets a fresh allocation, so keeping batches is always safe.
    """

    def __init__(self, size: int, nbytes: int, shared: bool = False) -> None:
        self.nbytes = nbytes
        # virtual until touched: a buffer costs memory from its first fill on, and is never faulted in again
        self.buffers = [torch.empty(nbytes, dtype=torch.uint8) for _ in range(size)]
        if shared:
            self.buffers = [b.share_memory_() for b in self.buffers]
        self._arrays = [b.numpy() for b in self.buffers]
        self._reserved: set[int] = set()  # dispatched to a worker, not yet wrapped
        self.misses = 0  # batches that found every buffer held and were allocated afresh

    def reserve(self, nbytes: int) -> int | None:
        """The number of a buffer that nothing uses, now reserved; None (a miss) when all are held or too small."""
        if nbytes <= self.nbytes:
            for slot in range(len(self._arrays)):
                # referenced by the list and by getrefcount's argument only: no tensor or view uses it any more
                if slot not in self._reserved and sys.getrefcount(self._arrays[slot]) == 2:
                    self._reserved.add(slot)
                    return slot
        self.misses += 1
        return None

    def release(self, slot: int) -> None:
        """Give up a reservation without wrapping it (its batch failed, or the epoch was abandoned)."""
        self._reserved.discard(slot)

    def view(self, slot: int, shape: tuple[int, ...]) -> torch.Tensor:
        """Buffer `slot`'s first bytes as a uint8 tensor of `shape` (in a worker: the memory it decodes into). A
        prefix, so the epoch's shorter last batch reuses a full batch's pages."""
        return torch.from_numpy(self.buffers[slot].numpy()[: int(np.prod(shape))].reshape(shape))

    def wrap(self, slot: int, shape: tuple[int, ...]) -> torch.Tensor:
        """A reserved buffer as the batch's tensor; the reservation ends, and from now on the tensor's life (and
        its views') keeps the buffer in use, through the reference its view holds on the pool's array."""
        self._reserved.discard(slot)
        return torch.from_numpy(self._arrays[slot][: int(np.prod(shape))].reshape(shape))

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        """An uninitialised uint8 tensor of `shape` that no live tensor shares memory with."""
        slot = self.reserve(int(np.prod(shape)))
        return torch.empty(shape, dtype=torch.uint8) if slot is None else self.wrap(slot, shape)


@dataclass(frozen=True)
class BatchResult:
    """A worker's answer for batch `index` of the epoch: its images in one of three forms, or a failure.

    The images come as `images` (a tensor of their own, in shared memory from a worker), as `slot` and `shape`
    (the consumer's pool buffer that the worker filled: only its number travels back), or as `raw` (the encoded
    bytes, which the consumer decodes on its device). `unreadable` names the shards of samples that could not
    be read, with why; `failed` means the batch has no images: the policy is 'fail', or no image of the batch
    was left to stand in for the unreadable ones. A `slot` without a `shape` was reserved but not filled.
    """

    index: int
    unreadable: dict[str, str] = field(default_factory=dict)  # shard name -> why a sample of it was not read
    failed: bool = False
    images: torch.Tensor | None = None  # uint8 (B, C, h, w), channels-last in memory
    slot: int | None = None  # the pool buffer reserved for this batch
    shape: tuple[int, ...] | None = None  # (B, h, w, C) of the images in buffer `slot`, once filled
    raw: list[torch.Tensor] | None = None  # uint8 encoded bytes, one tensor per image

    def pin_memory(self) -> BatchResult:
        """Page-locked copies of the tensors, so their copy to the GPU is asynchronous: the hook DataLoader's
        pin_memory=True calls on a batch of a custom type."""
        return replace(self, images=None if self.images is None else self.images.pin_memory(),
                       raw=None if self.raw is None else [t.pin_memory() for t in self.raw])


class BatchJobs(Dataset):
    """Batch i of an epoch: its samples read and decoded, then cropped/flipped (a DataLoader worker's work).

    An item is a batch number, or (batch number, buffer): the pool buffer (`buffers[slot]`) the consumer reserved
    for it, which the worker fills and names in its result instead of sending pixels (None: allocate one).
    A sample that cannot be read is reported back instead of raised (a worker's exception would reach the
    training process wrapped in a traceback dump): under 'skip' it is replaced by another image of the same
    batch, so the batch keeps its size and every rank its batch count; under 'fail' the batch fails.
    """

    def __init__(self, reader: Reader, batches: list[tuple[np.ndarray, np.ndarray]], params: list,
                 crop_size: tuple[int, int] | None, skip: bool, raw: bool = False, pool: BatchPool | None = None
                 ) -> None:
        self.reader, self.batches, self.params = reader, batches, params
        self.crop_size, self.skip, self.raw, self.pool = crop_size, skip, raw, pool

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, item: int | tuple[int, int | None]) -> BatchResult:
        i, slot = item if isinstance(item, tuple) else (item, None)
        images, bad = self._read(i)
        good = [image for image in images if image is not None]
        if bad and (not self.skip or not good):
            return BatchResult(i, bad, failed=True, slot=slot)
        images = [good[0] if image is None else image for image in images]
        if self.raw:  # decoded on the training device by the loader (nvJPEG on a GPU)
            raw = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in images]
            return BatchResult(i, bad, raw=raw, slot=slot)
        c, height, width = images[0].shape
        shape = (len(images), *(self.crop_size or (height, width)), c)  # (B, h, w, C)
        if slot is not None:  # the consumer's buffer: only its number travels back
            self._fill(images, self.params[i], self.pool.view(slot, shape))
            return BatchResult(i, bad, slot=slot, shape=shape)
        batch = self._empty(shape)
        self._fill(images, self.params[i], batch)
        return BatchResult(i, bad, images=batch.permute(0, 3, 1, 2))

    def _read(self, i: int) -> tuple[list, dict[str, str]]:
        """Batch i's images (encoded bytes when `raw`), None for each that failed, and shard name -> why."""
        shards, samples = self.batches[i]
        images, bad = [], {}
        for shard, sample in zip(shards.tolist(), samples.tolist(), strict=True):
            try:
                images.append(self.reader.raw(shard, sample) if self.raw else self.reader.decode(shard, sample))
            except CORRUPTION as err:
                reason = f"could not be read at sample {sample} ({type(err).__name__}: {err})"
                bad.setdefault(self.reader.names[shard], reason)
                images.append(None)
        return images, bad

    def _empty(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Memory for a batch the consumer gave no buffer for."""
        if get_worker_info() is not None:  # in shared memory, so that it travels as a handle, not a copy
            return torch.empty(shape, dtype=torch.uint8).share_memory_()
        if self.pool is not None:
            return self.pool.take(shape)
        return torch.empty(shape, dtype=torch.uint8)

    def _fill(self, images: list[torch.Tensor], params: np.ndarray | None, batch: torch.Tensor) -> None:
        """Each image cropped and mirrored (`augment.crop_flip`'s rule) straight into the (B, h, w, C) batch.

        The batch keeps the decoders' interleaved pixel order (channels last), so an uncropped image is one
        memcpy: making it planar (B, C, h, w) here cost a strided copy of 0.13 ms per 256-px photo next to a
        0.63 ms decode (bench/LOG.md, 2026-12-06), while the consumer's uint8 -> float cast reorders for free
        on a GPU and for ~0.09 ms on a CPU (`vae.objectives.inputs.to_input`)."""
        h, w = batch.shape[1:3]
        out = batch.numpy()
        for j, image in enumerate(images):
            pixels = image.permute(1, 2, 0).numpy()  # (H, W, C): decoders lay pixels out interleaved
            if params is not None:
                top, left, flip = (int(v) for v in params[j])
                pixels = pixels[top : top + h, left : left + w]
                pixels = pixels[:, ::-1] if flip else pixels
            np.copyto(out[j], pixels)


def decode_batch(raw: list[torch.Tensor], channels: int, device: torch.device) -> torch.Tensor:
    """JPEG bytes of a batch -> uint8 (B, C, H, W) on `device`, in one batched call (nvJPEG on a GPU)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    mode = {1: ImageReadMode.GRAY, 3: ImageReadMode.RGB}.get(channels)
    try:
        if mode is None:
            raise RuntimeError("JPEG has no alpha channel")
        images = decode_jpeg(raw, mode=mode, device=device)
    except RuntimeError:  # not all JPEG (a passthrough PNG), or a mode JPEG lacks: decode one by one
        images = [decode_tensor(bytes(t.numpy()), channels).to(device) for t in raw]
    return torch.stack(images)
