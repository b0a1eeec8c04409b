"""`arrays`: images in `.npy` / `.npz` files, (N, H, W), (N, H, W, C) or (N, C, H, W), optional labels.

One file per split (`files: {train: a.npz, test: b.npz}`). An `.npz` holds the images under `images_key`
and, when present, labels under `labels_key` and factors under `factors_key`; an `.npy` holds only images,
with labels from a separate `.npy` in `labels`. `.npy` files are memory-mapped, so a shard group reads only
its rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from pipeline.errors import SourceError
from pipeline.records import Record
from pipeline.sources import Source, SourceConfig

_CHANNELS = (1, 3, 4)


class ArraysConfig(SourceConfig):
    files: dict[str, Path] = Field(description="Split name -> .npy or .npz file of images.")
    labels: dict[str, Path] = Field(default_factory=dict, description="Split name -> .npy of labels (N,), optional.")
    images_key: str = Field("images", description="Array name of the images in an .npz (or its only array).")
    labels_key: str = Field("labels", description="Array name of the labels in an .npz, used when present.")
    factors_key: str = Field("factors", description="Array name of per-sample factors (N, K) in an .npz, if any.")
    layout: Literal["auto", "NHW", "NHWC", "NCHW"] = Field(
        "auto", description="Axis order; auto: 3-D is NHW, 4-D is NHWC when the last axis is 1, 3 or 4, else NCHW."
    )


def _open(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise SourceError(f"arrays source: {path} does not exist or is not a file; check source.options.files")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        return {"": np.load(path, mmap_mode="r", allow_pickle=False)}
    except (ValueError, OSError) as err:
        raise SourceError(f"arrays source: {path} is not a readable .npy/.npz file ({err})") from None


def _layout(shape: tuple[int, ...], requested: str, path: Path) -> str:
    if requested != "auto":
        if len(shape) != len(requested):
            raise SourceError(f"arrays source: {path} has shape {shape}, which is not {requested}")
        return requested
    if len(shape) == 3:
        return "NHW"
    if len(shape) == 4:
        last, first = shape[3] in _CHANNELS, shape[1] in _CHANNELS
        if last and first and shape[1] != shape[3]:
            raise SourceError(
                f"arrays source: {path} has shape {shape}: both axis 1 and axis 3 could be channels; "
                "set source.options.layout to NHWC or NCHW"
            )
        if last or first:
            return "NHWC" if last else "NCHW"
    raise SourceError(
        f"arrays source: {path} has shape {shape}; expected (N, H, W), (N, H, W, C) or (N, C, H, W) with C in 1, 3, 4"
    )


class ArraysSource(Source):
    name = "arrays"
    Config = ArraysConfig

    def splits(self) -> list[str]:
        if not self.config.files:
            raise SourceError("arrays source: source.options.files is empty; give {split: path} for each split")
        return list(self.config.files)

    def _arrays(self, split: str) -> tuple[np.ndarray, str, np.ndarray | None, np.ndarray | None]:
        self._check_split(split)
        path = self.config.files[split]
        arrays = _open(path)
        if "" in arrays:
            images = arrays[""]
        elif self.config.images_key in arrays:
            images = arrays[self.config.images_key]
        elif len(arrays) == 1:
            images = next(iter(arrays.values()))
        else:
            raise SourceError(
                f"arrays source: {path} has no array {self.config.images_key!r} (it has {sorted(arrays)}); "
                "set source.options.images_key"
            )
        if images.dtype == np.bool_:
            images = images.astype(np.uint8) * 255
        elif images.dtype != np.uint8:
            raise SourceError(
                f"arrays source: {path} holds {images.dtype} images; store uint8 0..255 "
                "(e.g. np.rint(x * 255).astype(np.uint8) for floats in [0, 1])"
            )
        layout = _layout(images.shape, self.config.layout, path)
        labels = arrays.get(self.config.labels_key)
        if split in self.config.labels:
            labels = _open(self.config.labels[split])[""]
        factors = arrays.get(self.config.factors_key)
        for what, extra in (("labels", labels), ("factors", factors)):
            if extra is not None and len(extra) != len(images):
                raise SourceError(f"arrays source: {len(images)} images in {path} but {len(extra)} {what}")
        if labels is not None and not np.issubdtype(labels.dtype, np.integer):
            raise SourceError(f"arrays source: labels for {split!r} are {labels.dtype}; class indices must be integers")
        return images, layout, labels, factors

    def num_records(self, split: str) -> int:
        return len(self._arrays(split)[0])

    def records(self, split: str, start: int = 0, stop: int | None = None) -> Iterator[Record]:
        images, layout, labels, factors = self._arrays(split)
        for i in range(*slice(start, stop).indices(len(images))):
            image = np.asarray(images[i])
            image = image[..., None] if layout == "NHW" else image.transpose(1, 2, 0) if layout == "NCHW" else image
            yield Record(
                key=f"{split}-{i:07d}",
                image=np.ascontiguousarray(image),
                label=None if labels is None else int(labels[i]),
                factors=None if factors is None else np.asarray(factors[i], np.float32),
            )
