"""Tiny input files in the formats the source plugins read, written from arrays."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np


def rng_images(n: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """`n` uint8 images of `shape`, uniform noise from `seed`."""
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def write_idx(path: Path, array: np.ndarray) -> None:
    """A gzipped IDX file (MNIST's format) holding the uint8 `array`."""
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + np.array(array.shape, ">i4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def write_cifar10_bin(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Official binary layout: label byte, then the red, green and blue planes, row-major."""
    planes = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    path.write_bytes(np.concatenate([labels[:, None].astype(np.uint8), planes], axis=1).tobytes())
