"""Loading latent shards (`pipeline.latents`, what `vaepipe encode` writes) for a diffusion trainer: the same rank
slices, seeded shuffle, resume position and corrupt-shard policy as images (`base.py`), yielding `LatentBatch`es.

A latent sample needs no decode, so every sample is read in this process, each array by one seek and read at
the offset its shard's table gives. The epoch plan is `ShardLoader.plan`, whether the split is resident (read
once into tensors on the device, then gathered by index) or streamed (read from the files each epoch): both give
the same batches, bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.errors import ShardFormatError
from pipeline.latents import DTYPES, LatentIndex, LatentTable, read_index, restored, scan
from pipeline.loader.base import ShardLoader

BITS = {2: torch.int16, 4: torch.int32}  # an integer dtype of each value width: how the resident split is held


@dataclass(frozen=True, slots=True)
class LatentBatch:
    """A batch of posteriors in index.json's dtype (bf16 restored bit for bit), unscaled: a diffusion model
    trains on `(mean - shift_factor) * scaling_factor` (`loader.index` holds both)."""

    mean: torch.Tensor  # (B, C, h, w)
    std: torch.Tensor  # (B, C, h, w)
    labels: torch.Tensor | None  # int64 (B,), when the split has labels
    captions: list[str] | None  # when the split has captions (index.json's `captions`)
    keys: list[str]  # the source's keys
    mean_flip: torch.Tensor | None = None  # (B, C, h, w): the mirrored image's posterior, when the encode made it
    std_flip: torch.Tensor | None = None


class LatentLoader(ShardLoader):
    """Iterates one split of a latent directory for one rank (see the module docstring and `ShardLoader`).

    resident: read the split once into tensors on `device` (`open_loader` decides, as for images). crop_size,
    crop and flip do not apply (the encode applied its crop, and the mirrored twin is stored); workers are not
    used (nothing to decode).
    """

    index: LatentIndex
    repair = "Re-run `vaepipe encode` into {location} with --overwrite"

    def __init__(self, *args, resident: bool = False, **kwargs) -> None:
        if kwargs.get("flip"):
            raise ValueError("latents are not flipped at load time: encode with --flip and read the stored twin "
                             "(LatentBatch.mean_flip, std_flip)")
        super().__init__(*args, **kwargs)
        self.resident = resident
        self._data: torch.Tensor | None = None  # resident: (N, F, C, h, w), the values' bits as integers (`load`)
        self._first = np.concatenate([[0], np.cumsum(self.counts)])  # row of each shard's first sample

    def _read_index(self) -> LatentIndex:
        return read_index(self.location)

    def _table_of(self, f, name: str) -> LatentTable:
        return scan(f, self.index, self.split)

    def _checked_crop(self, crop_size: tuple[int, int] | None) -> None:
        if crop_size is not None:
            raise ValueError(f"latents are not cropped at load time (crop size {tuple(crop_size)}): the encode "
                             "applied its crop (index.json's `transform`); encode again with --crop-size")
        return None

    @property
    def nbytes(self) -> int:
        """Bytes of the split's arrays as stored (every field of every sample)."""
        return latent_bytes(self.index, self.split)

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of each latent."""
        return tuple(self.index.latent_shape)

    # ---- reading

    def _read(self, shards: np.ndarray, samples: np.ndarray, files: dict) -> np.ndarray:
        """The given samples' arrays from the files, as stored: (n, F, C, h, w)."""
        fields, shape = len(self.index.fields), tuple(self.index.latent_shape)
        out = np.empty((len(shards), fields, *shape), DTYPES[self.index.dtype][1])
        flat = out.reshape(len(shards), fields, -1)
        for i, (shard, sample) in enumerate(zip(shards.tolist(), samples.tolist(), strict=True)):
            table = self._tables[shard]
            if shard not in files:
                files[shard] = self.location.open(self.names[shard])
            f = files[shard]
            for k in range(fields):
                f.seek(int(table.offsets[sample, k]))
                data = f.read(int(table.sizes[sample]))
                if len(data) != table.sizes[sample]:  # the size was checked by the scan: the file changed since
                    raise ShardFormatError(f"{self.location.display(self.names[shard])} shrank while it was read; "
                                           "is an encode writing into it?")
                flat[i, k] = np.frombuffer(data, flat.dtype)
        return out

    def load(self) -> torch.Tensor:
        """Resident: every readable shard's arrays, read once, on the device, one row per sample of the split
        (rows of skipped shards are never planned, so never used). Held as their bits in an integer dtype of the
        same width, viewed as the values per batch: on a CPU torch's index_select of 256 fp16 rows of 2 x 4 x 32
        x 32 took 12.3 ms, of the same bits as int16 0.11 ms (bf16: 4.3 ms; 2-core box, bench/LOG.md 2026-12-08)."""
        if self._data is None:
            shards, samples = self.readable_rows()
            files: dict = {}
            try:
                arrays = self._read(shards, samples, files)
            finally:
                for f in files.values():
                    f.close()
            rows = np.zeros((self.num_samples, *arrays.shape[1:]), arrays.dtype)
            rows[self._first[shards] + samples] = arrays
            values = restored(rows, self.index.dtype)
            self._data = values.view(BITS[values.element_size()]).to(self.device)
        return self._data

    def _batches(self, skip: int) -> Iterator[tuple[int, LatentBatch]]:
        plan = self.plan()
        count = self.batch_count(len(plan.order))
        data = self.load() if self.resident else None
        files: dict = {}
        try:
            for b in range(skip, count):
                mine = plan.order[b * self.batch_size : (b + 1) * self.batch_size]
                shards, samples = plan.shards[mine], plan.samples[mine]
                if data is not None:
                    rows = torch.from_numpy(self._first[shards] + samples).to(self.device)
                    arrays = data.index_select(0, rows).view(DTYPES[self.index.dtype][0])
                else:
                    arrays = restored(self._read(shards, samples, files), self.index.dtype).to(self.device)
                yield b, self._batch(arrays, shards, samples)
        finally:
            for f in files.values():
                f.close()

    def _batch(self, arrays: torch.Tensor, shards: np.ndarray, samples: np.ndarray) -> LatentBatch:
        labels, _ = self.extras(shards, samples)
        tables = [self._tables[s] for s in shards.tolist()]
        keys = [t.keys[i] for t, i in zip(tables, samples.tolist(), strict=True)]
        captions = ([t.texts[i] for t, i in zip(tables, samples.tolist(), strict=True)]
                    if self.index.split(self.split).captions else None)
        fields = dict(zip(self.index.fields, arrays.unbind(1), strict=True))
        return LatentBatch(fields["mean"], fields["std"], None if labels is None else labels.to(self.device),
                           captions, keys, fields.get("mean_flip"), fields.get("std_flip"))


def latent_bytes(index: LatentIndex, split: str) -> int:
    """Bytes of a latent split's arrays as stored, from index.json alone."""
    return index.split(split).num_samples * len(index.fields) * index.array_bytes
