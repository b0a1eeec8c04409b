"""Tiny input files in the formats the source plugins read, written from arrays."""

from __future__ import annotations

import gzip
import struct
import zlib
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


def one_colour_png(width: int, height: int) -> bytes:
    """A black 8-bit grayscale PNG of any size, written a band of rows at a time (never whole in memory): a
    decompression bomb when large. 30000 x 30000 is 874,852 bytes on disk and 900 MB decoded; ~4 s to write."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + width)  # filter type 0, then `width` black pixels
    deflate, band = zlib.compressobj(9), 256
    idat = [deflate.compress(row * band) for _ in range(height // band)]
    idat += [deflate.compress(row * (height % band)), deflate.flush()]
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8 bits, grayscale, deflate, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(idat)) + chunk(b"IEND", b"")
