"""`idx`: MNIST-format (IDX) files, gzipped or not: MNIST, Fashion-MNIST, KMNIST, EMNIST."""

import functools
import gzip
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from pydantic import Field

from pipeline.errors import SourceError
from pipeline.records import Record
from pipeline.sources import Source, SourceConfig

# IDX type codes (the third magic byte) -> numpy big-endian dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_SPLIT_STEMS = {"train": "train", "test": "t10k"}


class IdxConfig(SourceConfig):
    root: Path = Field(description="Directory holding the IDX files.")
    prefix: str = Field("", description="File-name prefix, e.g. 'emnist-balanced-' for EMNIST.")
    transpose: bool = Field(False, description="Transpose each image (EMNIST stores them column-major).")


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally .gz) into an array of its declared dtype and shape."""
    stat = path.stat()
    return _read_idx(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _read_idx(path: Path, mtime_ns: int, size: int) -> np.ndarray:
    """Cached per process: the shard groups of one split each read the file (a gunzip of ~50 MB for MNIST)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise SourceError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    body = raw[4 + 4 * ndim :]
    if len(body) != expected:
        raise SourceError(f"{path} is truncated or corrupt: header says {expected} bytes of data, found {len(body)}")
    array = np.frombuffer(body, dtype=dtype).reshape(tuple(int(d) for d in dims))
    array.flags.writeable = False  # shared by the cache
    return array


class IdxSource(Source):
    """Reads `{prefix}{train,t10k}-images-idx3-ubyte[.gz]` and the matching `labels-idx1` files."""

    name = "idx"
    Config = IdxConfig

    def _find(self, split: str, kind: str) -> Path | None:
        stem = f"{self.config.prefix}{_SPLIT_STEMS[split]}-{kind}"
        for candidate in (self.config.root / stem, self.config.root / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
        return None

    def splits(self) -> list[str]:
        if not self.config.root.is_dir():
            raise SourceError(f"idx source: directory {self.config.root} does not exist; set source.options.root")
        found = [s for s in _SPLIT_STEMS if self._find(s, "images-idx3-ubyte")]
        if not found:
            raise SourceError(
                f"idx source: no '{self.config.prefix}train-images-idx3-ubyte[.gz]' or "
                f"'{self.config.prefix}t10k-images-idx3-ubyte[.gz]' in {self.config.root}"
            )
        return found

    def num_records(self, split: str) -> int:
        self._check_split(split)
        path = self._find(split, "images-idx3-ubyte")
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            header = f.read(8)
        if len(header) < 8 or header[:2] != b"\0\0" or header[2] not in _IDX_DTYPES:
            raise SourceError(f"{path} is not an IDX file (bad magic number {header[:4].hex()})")
        return int(np.frombuffer(header, ">i4", count=1, offset=4)[0])

    def records(self, split: str, start: int = 0, stop: int | None = None) -> Iterator[Record]:
        self._check_split(split)
        images = read_idx(self._find(split, "images-idx3-ubyte"))
        if images.ndim != 3 or images.dtype != np.uint8:
            raise SourceError(f"idx source: expected uint8 images (N, H, W), got {images.dtype} {images.shape}")
        labels_path = self._find(split, "labels-idx1-ubyte")
        labels = read_idx(labels_path) if labels_path else None
        if labels is not None and len(labels) != len(images):
            raise SourceError(f"idx source: {len(images)} images but {len(labels)} labels in {labels_path}")
        if self.config.transpose:
            images = images.transpose(0, 2, 1)
        for i in range(*slice(start, stop).indices(len(images))):
            label = None if labels is None else int(labels[i])
            yield Record(key=f"{split}-{i:06d}", image=np.ascontiguousarray(images[i])[..., None], label=label)
