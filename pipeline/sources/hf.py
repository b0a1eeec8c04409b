"""`hf`: a HuggingFace `datasets` dataset saved with `save_to_disk`, or parquet files (the Hub's format).

Needs the optional extra: `pip install 'vaepipe[hf]'`. The image column may be an `Image` feature or an array;
the label column, when present, must hold class indices (a `ClassLabel` or ints). An `Image` column is read as
its encoded files and decoded here, as the folder source decodes files: an image over `max_pixels` is rejected
from its header, and a file that needs no conversion keeps its bytes in the shards.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from pipeline.conform import BadImage, check_pixels, decode_source, pil_to_array
from pipeline.errors import SourceError
from pipeline.records import Record, Rejected
from pipeline.sources import Source, SourceConfig


class HFConfig(SourceConfig):
    path: Path | None = Field(None, description="Directory written by Dataset(Dict).save_to_disk.")
    parquet: dict[str, list[str]] | None = Field(None, description="Split name -> parquet files (paths or globs).")
    image_column: str = Field("image", description="Column holding the images.")
    label_column: str | None = Field("label", description="Column of class indices; used when present.")
    cache_dir: Path | None = Field(None, description="Where `datasets` caches converted parquet (default its own).")

    @model_validator(mode="after")
    def _one_input(self) -> HFConfig:
        if (self.path is None) == (self.parquet is None):
            raise ValueError("give exactly one of source.options.path (save_to_disk folder) or source.options.parquet")
        return self


def _datasets():
    try:
        import datasets
    except ImportError:
        raise SourceError("the hf source needs HuggingFace datasets: pip install 'vaepipe[hf]'") from None
    return datasets


def _to_array(value: Any, max_pixels: int) -> np.ndarray:
    if hasattr(value, "mode"):  # a PIL image (a feature `datasets` decodes itself)
        check_pixels(value.size, max_pixels)
        return pil_to_array(value)
    array = np.asarray(value)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise BadImage("mode", f"array of {array.dtype} {array.shape} is not a uint8 (H, W[, C]) image")
    check_pixels((array.shape[1], array.shape[0]), max_pixels)
    return array[..., None] if array.ndim == 2 else array


def _file(value: dict[str, Any]) -> bytes:
    """The encoded file of an `Image` feature read with decode=False: its bytes, or the file its path names."""
    if value.get("bytes") is not None:
        return value["bytes"]
    with open(value["path"], "rb") as f:
        return f.read()


class HFSource(Source):
    name = "hf"
    Config = HFConfig

    def _load(self) -> dict[str, Any]:
        datasets = _datasets()
        cfg = self.config
        if cfg.path is not None:
            if not cfg.path.is_dir():
                raise SourceError(f"hf source: {cfg.path} is not a directory; set source.options.path")
            try:
                loaded = datasets.load_from_disk(str(cfg.path))
            except FileNotFoundError as err:
                raise SourceError(f"hf source: {cfg.path} is not a saved dataset ({err})") from None
            return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
        missing = [f for files in cfg.parquet.values() for f in files if "*" not in f and not Path(f).is_file()]
        if missing:
            raise SourceError(f"hf source: parquet file(s) {missing} do not exist; check source.options.parquet")
        cache = None if cfg.cache_dir is None else str(cfg.cache_dir)
        loaded = datasets.load_dataset("parquet", data_files=cfg.parquet, cache_dir=cache)
        return dict(loaded)

    def _split(self, split: str):
        self._check_split(split)
        dataset = self._load()[split]
        if self.config.image_column not in dataset.column_names:
            raise SourceError(
                f"hf source: split {split!r} has no column {self.config.image_column!r} (columns: "
                f"{dataset.column_names}); set source.options.image_column"
            )
        return dataset

    def splits(self) -> list[str]:
        return list(self._load())

    def num_records(self, split: str) -> int:
        return len(self._split(split))

    def records(self, split: str, start: int = 0, stop: int | None = None) -> Iterator[Record | Rejected]:
        dataset = self._split(split)
        column = self.config.image_column
        files = isinstance(dataset.features[column], _datasets().Image)
        if files:  # the encoded files, decoded below: `datasets` would decode any size, and EXIF-rotate none
            dataset = dataset.cast_column(column, _datasets().Image(decode=False))
        label_column = self.config.label_column if self.config.label_column in dataset.column_names else None
        lo, hi, _ = slice(start, stop).indices(len(dataset))
        for offset, row in enumerate(dataset.select(range(lo, hi))):
            key = f"{split}-{lo + offset:07d}"
            data, kept_as = None, None
            try:
                if files:
                    data = _file(row[column])
                    image, kept_as = decode_source(data, self.max_pixels)
                else:
                    image = _to_array(row[column], self.max_pixels)
            except BadImage as err:
                yield Rejected(key, err.kind, str(err))
                continue
            except OSError as err:  # an image file the dataset names that cannot be read
                yield Rejected(key, "unreadable", f"cannot be read: {err}")
                continue
            label = None if label_column is None else int(row[label_column])
            yield Record(key=key, image=np.ascontiguousarray(image), label=label,
                         encoded=data if kept_as else None, encoded_format=kept_as)
