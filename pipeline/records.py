"""The record: what every source yields and what the shard writer consumes.

A source yields `Record`s, and `Rejected` for an input it could not turn into an image (a corrupt or
unreadable file): the ingest's bad-input policy, not the source, decides whether that stops the run or is
skipped and reported.
"""

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Record:
    """One image from a source.

    key: unique within the source and split (it ends up in the shard as the sample's name).
    image: uint8 array (H, W, C); grayscale sources use C = 1.
    label: class index, when the source has labels.
    factors: ground-truth generative factors (K,), for disentanglement metrics, when known.
    text: the image's caption, when the source has one (img2dataset's `.txt`); stored with the image, so that
        latents made from the shards can carry it.
    encoded, encoded_format: the source's encoded file, when decoding it gives `image` with no conversion (no
        EXIF rotation, mode change, resize or crop); the encoded layout stores these bytes as they are.
    """

    key: str
    image: np.ndarray
    label: int | None = None
    factors: np.ndarray | None = None
    encoded: bytes | None = None  # the source file's bytes when they decode to exactly `image` (kept in shards)
    encoded_format: str | None = None  # their format: 'jpeg', 'png' or 'webp'
    text: str | None = None  # the caption

    def __post_init__(self) -> None:
        if self.image.dtype != np.uint8 or self.image.ndim != 3:
            raise ValueError(
                f"record {self.key!r}: image must be uint8 (H, W, C), got {self.image.dtype} {self.image.shape}"
            )


@dataclass(frozen=True, slots=True)
class Rejected:
    """An input that yields no image. kind: a short reason class ('corrupt', 'unreadable', 'size', ...)."""

    key: str
    kind: str
    reason: str
