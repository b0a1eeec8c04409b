"""`cifar`: the official CIFAR-10 and CIFAR-100 batch files, binary or python version.

Binary: CIFAR-10 records are 1 label byte + 3,072 pixel bytes (1,024 red, green, blue, row-major), in
`data_batch_{1..5}.bin` and `test_batch.bin`; CIFAR-100 records are 2 label bytes (coarse, fine) + 3,072, in
`train.bin` and `test.bin`. Python: pickled dicts of `data` (N, 3072) and `labels` / `fine_labels`, in
`data_batch_{1..5}` and `test_batch` (CIFAR-10) or `train` and `test` (CIFAR-100). The pickles are read by
an unpickler that only builds numpy arrays, lists and dicts, never arbitrary objects.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from pipeline.errors import SourceError
from pipeline.records import Record
from pipeline.sources import Source, SourceConfig

PIXELS = 3072  # 32 x 32 x 3
# split -> file-name patterns, for each (variant, format); a subset such as `test_batch_first1000.bin` matches
_PATTERNS = {
    ("cifar10", "binary"): {"train": "data_batch_*.bin", "test": "test_batch*.bin"},
    ("cifar100", "binary"): {"train": "train*.bin", "test": "test*.bin"},
    ("cifar10", "python"): {"train": "data_batch_[0-9]*", "test": "test_batch*"},
    ("cifar100", "python"): {"train": "train", "test": "test"},
}


class CifarConfig(SourceConfig):
    root: Path = Field(description="Directory holding the batch files (e.g. cifar-10-batches-bin).")
    variant: Literal["auto", "cifar10", "cifar100"] = Field(
        "auto", description="CIFAR-10 or CIFAR-100; auto: from the files present."
    )
    labels: Literal["fine", "coarse"] = Field("fine", description="CIFAR-100: the 100 fine or the 20 coarse classes.")


class _SafeUnpickler(pickle.Unpickler):
    """Builds only what CIFAR's pickles hold (numpy arrays); anything else is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")
        return super().find_class(module, name)


def _load_python_batch(path: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    try:
        with open(path, "rb") as f:
            raw = _SafeUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise SourceError(f"{path} is not a CIFAR python batch ({err}); check source.options.root") from None
    data = {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}
    images = np.asarray(data["data"], dtype=np.uint8)
    if images.ndim != 2 or images.shape[1] != PIXELS:
        raise SourceError(f"{path}: 'data' has shape {images.shape}, expected (N, {PIXELS})")
    labels = {k: np.asarray(data[k], np.int64) for k in ("labels", "fine_labels", "coarse_labels") if k in data}
    return images, labels


class CifarSource(Source):
    name = "cifar"
    Config = CifarConfig

    def _layout(self) -> tuple[str, str, dict[str, list[Path]]]:
        root = self.config.root
        if not root.is_dir():
            raise SourceError(f"cifar source: directory {root} does not exist; set source.options.root")
        variants = ["cifar10", "cifar100"] if self.config.variant == "auto" else [self.config.variant]
        for fmt in ("binary", "python"):
            for variant in variants:
                found = {s: sorted(p for p in root.glob(g) if p.is_file()) for s, g in _PATTERNS[variant, fmt].items()}
                found = {s: files for s, files in found.items() if files}
                if found:
                    return variant, fmt, found
        raise SourceError(
            f"cifar source: no CIFAR batch files in {root} (expected data_batch_*.bin / test_batch.bin, train.bin / "
            "test.bin, or the python batches data_batch_1 ... / train, test)"
        )

    def splits(self) -> list[str]:
        return list(self._layout()[2])

    def _record_size(self, variant: str) -> int:
        return PIXELS + (1 if variant == "cifar10" else 2)

    def _binary_counts(self, variant: str, files: list[Path]) -> list[int]:
        size = self._record_size(variant)
        counts = []
        for path in files:
            n, rest = divmod(path.stat().st_size, size)
            if rest:
                raise SourceError(
                    f"{path} is truncated or not a {variant} binary batch: {path.stat().st_size} bytes is not a "
                    f"multiple of the {size}-byte record; re-download it"
                )
            counts.append(n)
        return counts

    def num_records(self, split: str) -> int:
        variant, fmt, files = self._layout()
        self._check_split(split)
        if fmt == "binary":
            return sum(self._binary_counts(variant, files[split]))
        return sum(len(_load_python_batch(p)[0]) for p in files[split])

    def records(self, split: str, start: int = 0, stop: int | None = None) -> Iterator[Record]:
        variant, fmt, files = self._layout()
        self._check_split(split)
        offset = 0  # index of the first record of the current file within the split
        for path in files[split]:
            if fmt == "binary":
                size = self._record_size(variant)
                n = self._binary_counts(variant, [path])[0]
                data = np.memmap(path, dtype=np.uint8, mode="r", shape=(n, size))
                label_col = 0 if variant == "cifar10" else (1 if self.config.labels == "fine" else 0)
                labels, pixels = data[:, label_col], data[:, size - PIXELS :]
            else:
                pixels, label_sets = _load_python_batch(path)
                n = len(pixels)
                key = "labels" if variant == "cifar10" else f"{self.config.labels}_labels"
                if key not in label_sets:
                    raise SourceError(f"{path} has no {key!r}; is it a {variant} batch? set source.options.variant")
                labels = label_sets[key]
            lo, hi = max(start - offset, 0), n if stop is None else min(stop - offset, n)
            for i in range(lo, hi):
                image = np.ascontiguousarray(pixels[i].reshape(3, 32, 32).transpose(1, 2, 0))  # (32, 32, 3)
                yield Record(key=f"{path.name}-{i:05d}", image=image, label=int(labels[i]))
            offset += n
            if stop is not None and offset >= stop:
                return
