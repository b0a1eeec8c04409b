"""`cifar`: the official CIFAR-10 and CIFAR-100 batch files, binary or python version.

Binary: CIFAR-10 records are 1 label byte + 3,072 pixel bytes (1,024 red, green, blue, row-major), in
`data_batch_{1..5}.bin` and `test_batch.bin`; CIFAR-100 records are 2 label bytes (coarse, fine) + 3,072, in
`train.bin` and `test.bin`. Python: pickled dicts of `data` (N, 3072) and `labels` / `fine_labels`, in
`data_batch_{1..5}` and `test_batch` (CIFAR-10) or `train` and `test` (CIFAR-100). The pickles are read by
an unpickler that only builds numpy arrays, lists and dicts, never arbitrary objects.

`root` is the folder of batch files, or the folder above the one extracted archive folder
(`cifar-10-batches-bin/`, `cifar-10-batches-py/`, `cifar-100-binary/`, `cifar-100-python/`). A batch file
under another name (`test_batch_first1000.bin`) is read with a warning that gives its record count beside the
official one, as is an official binary file with another count; beside the official file of its split it is refused,
since the split would hold the same images twice.
"""

from __future__ import annotations

import functools
import logging
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
# the official archives' file names per split, and the records in each such file
_OFFICIAL = {
    ("cifar10", "binary"): {"train": {f"data_batch_{i}.bin" for i in range(1, 6)}, "test": {"test_batch.bin"}},
    ("cifar100", "binary"): {"train": {"train.bin"}, "test": {"test.bin"}},
    ("cifar10", "python"): {"train": {f"data_batch_{i}" for i in range(1, 6)}, "test": {"test_batch"}},
    ("cifar100", "python"): {"train": {"train"}, "test": {"test"}},
}
_OFFICIAL_RECORDS = {("cifar10", "train"): 10_000, ("cifar10", "test"): 10_000,
                     ("cifar100", "train"): 50_000, ("cifar100", "test"): 10_000}
_ARCHIVE_DIRS = {"cifar10": "cifar-10-batches-*", "cifar100": "cifar-100-*"}  # what the official archives extract to
log = logging.getLogger(__name__)


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


def _find(directory: Path, variants: list[str]) -> tuple[str, str, dict[str, list[Path]]] | None:
    """(variant, format, split -> batch files) of the first layout whose files are in `directory`."""
    for fmt in ("binary", "python"):
        for variant in variants:
            found = {s: sorted(p for p in directory.glob(g) if p.is_file()) for s, g in _PATTERNS[variant, fmt].items()}
            found = {s: files for s, files in found.items() if files}
            if found:
                return variant, fmt, found
    return None


def _check_names(variant: str, fmt: str, split: str, paths: list[Path]) -> None:
    """Refuse official and other batch files in one split (the same images twice); report each other one."""
    official = _OFFICIAL[variant, fmt][split]
    others = [p.name for p in paths if p.name not in official]
    if others and len(others) < len(paths):
        raise SourceError(
            f"cifar source: the {split} split of {paths[0].parent} would read the official "
            f"{', '.join(p.name for p in paths if p.name in official)} and also {', '.join(others)}, which is not an "
            "official CIFAR file name (a subset or a copy?); move it out of the folder"
        )
    for path in paths:
        stat = path.stat()
        _report_count(path, stat.st_size, stat.st_mtime_ns, variant, fmt, split, path.name in official)


@functools.cache  # one warning per file version and process, however often the layout is looked up
def _report_count(path: Path, size: int, mtime: int, variant: str, fmt: str, split: str, official: bool) -> None:
    expected = _OFFICIAL_RECORDS[variant, split]
    if fmt == "binary":
        count = size // (PIXELS + (1 if variant == "cifar10" else 2))
    elif official:
        return  # an official python batch: counting it means unpickling 30 MB more per lookup
    else:
        count = len(_load_python_batch(path)[0])
    if not official:
        log.warning("cifar source: the %s split reads %s, which is not an official %s file name: it holds %d "
                    "records where the official %s file holds %d, so it is a subset or another file, and figures "
                    "on it are not comparable with published %s results", split, path, variant, count, split,
                    expected, variant)
    elif count != expected:
        log.warning("cifar source: %s holds %d records where the official file holds %d: a subset or a "
                    "modified copy", path, count, expected)


class CifarSource(Source):
    name = "cifar"
    Config = CifarConfig

    def _layout(self) -> tuple[str, str, dict[str, list[Path]]]:
        root = self.config.root
        if not root.is_dir():
            raise SourceError(f"cifar source: directory {root} does not exist; set source.options.root")
        variants = ["cifar10", "cifar100"] if self.config.variant == "auto" else [self.config.variant]
        found = _find(root, variants)
        if found is None:  # the folder above the extracted archive: descend into that one folder
            below = [(d, f) for v in variants for d in sorted(root.glob(_ARCHIVE_DIRS[v]))
                     if d.is_dir() and (f := _find(d, variants))]
            if len(below) > 1:
                raise SourceError(
                    f"cifar source: {root} holds several CIFAR folders ({', '.join(d.name for d, _ in below)}); set "
                    "source.options.root to one of them"
                )
            found = below[0][1] if below else None
        if found is None:
            raise SourceError(
                f"cifar source: no CIFAR batch files in {root} nor in a cifar-10-batches-*/cifar-100-* folder in it "
                "(expected data_batch_*.bin / test_batch.bin, train.bin / test.bin, or the python batches "
                "data_batch_1 ... / train, test)"
            )
        variant, fmt, files = found
        for split, paths in files.items():
            _check_names(variant, fmt, split, paths)
        return found

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
