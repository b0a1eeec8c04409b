"""Reading samples by (shard, sample), in this process or in DataLoader worker processes.

`Reader` holds what a worker needs (the shard tables, the layout, the location) and keeps its own open files,
so each worker opens the shards it reads after the fork. `BatchJobs` is the map-style dataset torch's
`DataLoader` runs in its workers: item i is batch i of the epoch's plan, decoded (and cropped) in the worker.
"""

from __future__ import annotations

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


class BatchJobs(Dataset):
    """Batch i of an epoch: its samples read and decoded, then cropped/flipped (a DataLoader worker's work).

    A sample that cannot be read is reported back instead of raised (a worker's exception would reach the
    training process wrapped in a traceback dump): under 'skip' it is replaced by another image of the same
    batch, so the batch keeps its size and every rank its batch count; under 'fail' the batch carries the error.
    """

    def __init__(self, reader: Reader, batches: list[tuple[np.ndarray, np.ndarray]], params: list,
                 crop_size: tuple[int, int] | None, skip: bool, raw: bool = False) -> None:
        self.reader, self.batches, self.params = reader, batches, params
        self.crop_size, self.skip, self.raw = crop_size, skip, raw

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
        travels as a handle. (Stacking 256 photos of 256 px cost a quarter of the decode time.)"""
        c, height, width = images[0].shape
        h, w = self.crop_size or (height, width)
        batch = torch.empty((len(images), c, h, w), dtype=torch.uint8)
        if get_worker_info() is not None:
            batch.share_memory_()
        for j, image in enumerate(images):
            if params is not None:
                top, left, flip = (int(v) for v in params[j])
                image = image[:, top : top + h, left : left + w]
                image = image.flip(-1) if flip else image
            batch[j].copy_(image)
        return batch


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
