"""Reading samples by (shard, sample), in this process or in DataLoader worker processes.

`Reader` holds what a worker needs (the shard tables, the layout, the location) and keeps its own open files,
so each worker opens the shards it reads after the fork. `BatchJobs` is the map-style dataset torch's
`DataLoader` runs in its workers: item i is batch i of the epoch's plan, decoded (and cropped) in the worker.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from pipeline.layouts import Layout, ShardTable, decode_tensor
from pipeline.loader.base import CORRUPTION
from pipeline.storage import Location


class Reader:
    """Reads samples of readable shards (their tables are known) into uint8 (n, C, H, W) tensors."""

    def __init__(self, location: Location, names: list[str], tables: dict[int, ShardTable | None], layout: Layout,
                 image_shape: tuple[int, int, int]) -> None:
        self.location, self.names, self.tables = location, names, tables
        self.layout, self.image_shape = layout, tuple(image_shape)
        self._files: dict[int, Any] = {}

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
    """Batch buffers that are filled again once nobody holds them (in the process that consumes the batches).

    Filling a freshly allocated batch costs a page fault per 4 kB touched: a 256-photo batch of 256 px is 50 MB,
    above glibc's largest mmap threshold (32 MB), so every new batch is a fresh mapping; the faults cost ~0.17 ms
    per 256-px photo, a quarter of its decode (bench/LOG.md, 2026-12-06). A buffer is a numpy array, handed out as
    `torch.from_numpy`: every tensor and view of it keeps the array alive, so the array's reference count says
    whether anything still uses it. torch exposes no public use count for a storage, hence this.
    """

    def __init__(self, size: int = 3) -> None:
        self.size = size  # buffers kept: the batch the consumer holds, the one being filled, and one spare
        self._arrays: list[np.ndarray] = []

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        """An uninitialised uint8 tensor of `shape` that no live tensor shares memory with."""
        need = int(np.prod(shape))
        for i in range(len(self._arrays)):
            # referenced by the list and by getrefcount's argument only: no tensor or view uses it any more
            if sys.getrefcount(self._arrays[i]) == 2:
                if len(self._arrays[i]) < need:
                    self._arrays[i] = np.empty(need, np.uint8)
                # a prefix, so the epoch's shorter last batch reuses a full batch's pages (the view keeps the
                # array referenced, and so marked in use, as long as the tensor lives)
                return torch.from_numpy(self._arrays[i][:need].reshape(shape))
        array = np.empty(need, np.uint8)
        if len(self._arrays) < self.size:
            self._arrays.append(array)
        return torch.from_numpy(array.reshape(shape))  # all in use (the consumer keeps its batches): a fresh one


class BatchJobs(Dataset):
    """Batch i of an epoch: its samples read and decoded, then cropped/flipped (a DataLoader worker's work).

    A sample that cannot be read is reported back instead of raised (a worker's exception would reach the
    training process wrapped in a traceback dump): under 'skip' it is replaced by another image of the same
    batch, so the batch keeps its size and every rank its batch count; under 'fail' the batch carries the error.
    """

    def __init__(self, reader: Reader, batches: list[tuple[np.ndarray, np.ndarray]], params: list,
                 crop_size: tuple[int, int] | None, skip: bool, raw: bool = False, pool: BatchPool | None = None
                 ) -> None:
        self.reader, self.batches, self.params = reader, batches, params
        self.crop_size, self.skip, self.raw, self.pool = crop_size, skip, raw, pool

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, Any]:
        shards, samples = self.batches[i]
        images, bad = [], {}
        for shard, sample in zip(shards.tolist(), samples.tolist(), strict=True):
            try:
                images.append(self.reader.raw(shard, sample) if self.raw else self.reader.decode(shard, sample))
            except CORRUPTION as err:
                reason = f"could not be read at sample {sample} ({type(err).__name__}: {err})"
                bad.setdefault(self.reader.names[shard], reason)
                images.append(None)
        good = [image for image in images if image is not None]
        if bad and (not self.skip or not good):
            return {"error": bad, "index": i}
        images = [good[0] if image is None else image for image in images]
        if self.raw:  # decoded on the training device by the loader (nvJPEG on a GPU)
            return {"raw": [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in images], "skipped": bad,
                    "index": i}
        return {"images": self._assemble(images, self.params[i]), "skipped": bad, "index": i}

    def _assemble(self, images: list[torch.Tensor], params: np.ndarray | None) -> torch.Tensor:
        """The batch (B, C, h, w), each image cropped and mirrored (`augment.crop_flip`'s rule) straight into it.

        One copy per image into one allocation: `torch.stack` then a crop would copy twice, and a worker's result
        would be copied a third time into shared memory to reach the training process; allocated there, it
        travels as a handle. (Stacking 256 photos of 256 px cost a quarter of the decode time.) In the consuming
        process the batch comes from the pool, whose buffers are already paged in."""
        c, height, width = images[0].shape
        h, w = self.crop_size or (height, width)
        shape = (len(images), c, h, w)
        if get_worker_info() is not None:
            batch = torch.empty(shape, dtype=torch.uint8).share_memory_()
        elif self.pool is not None:
            batch = self.pool.take(shape)
        else:
            batch = torch.empty(shape, dtype=torch.uint8)
        out = batch.numpy()
        for j, image in enumerate(images):
            pixels = image.permute(1, 2, 0).numpy()  # (H, W, C): decoders lay pixels out interleaved
            if params is not None:
                top, left, flip = (int(v) for v in params[j])
                pixels = pixels[top : top + h, left : left + w]
                pixels = pixels[:, ::-1] if flip else pixels
            planar_copy(pixels, out[j])
        return batch


def planar_copy(pixels: np.ndarray, out: np.ndarray) -> None:
    """Interleaved uint8 (h, w, C), any strides -> planar `out` (C, h, w), one strided numpy copy per channel.

    Hand-written because the obvious `out.copy_(chw_view)` is torch's generic strided uint8 loop: 0.39-0.42 ms
    for a 256-px photo against 0.17 ms here (and a memcpy's 0.02 ms), with the decode at ~0.6 ms
    (bench/LOG.md, 2026-12-06): it was most of the gap between the loader and the decoder."""
    channels = pixels.shape[2]
    if pixels.flags.c_contiguous:  # whole image: each channel is every C-th byte of one flat run
        flat, planes = pixels.reshape(-1), out.reshape(channels, -1)
        for c in range(channels):
            np.copyto(planes[c], flat[c::channels])
    else:  # a crop or a mirror: a 2-D strided view per channel
        for c in range(channels):
            np.copyto(out[c], pixels[..., c])


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
