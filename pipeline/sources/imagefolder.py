"""`imagefolder`: a tree of image files in any still-image format Pillow decodes; labels from the first-level
subfolders when present.

    root/cat/001.png, root/dog/002.jpg  -> labels 0 (cat), 1 (dog), classes sorted by name
    root/train/cat/..., root/test/cat/... -> splits train and test, each with the same class folders

Which files are images: those whose suffix is one Pillow registers for a format it decodes by itself
(`default_extensions`), and, unless `identify_unknown` is off, files with no suffix or another one (Yale's
`subject01.happy`) that Pillow identifies as such an image by their content (magic bytes). Other files
(README, labels.csv) are ignored and counted in the log, never reported as corrupt.

Files are listed once, sorted, so the order (and each shard group's range) is deterministic. A file that
cannot be read or decoded is yielded as `Rejected` with the reason; the ingest's policy decides its fate.
Decoding (`pipeline.conform.image_to_array`): the first frame of a multi-frame GIF/TIFF, upright by its EXIF
orientation, palette/CMYK/16-bit modes converted to 8-bit L, RGB or RGBA.
"""

from __future__ import annotations

import functools
import logging
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError
from pydantic import Field

from pipeline.conform import BadImage, admit_pixels, decode_source
from pipeline.errors import SourceError
from pipeline.records import Record, Rejected
from pipeline.sources import Source, SourceConfig

SPLIT_DIRS = ("train", "val", "validation", "test")
# Formats Pillow registers but cannot decode by itself: identify-only stubs (BUFR, GRIB, HDF5, WMF off
# Windows) are found by class below; MPEG is a video header reader and EPS needs the Ghostscript program.
_NOT_DECODED = {"MPEG", "EPS"}
log = logging.getLogger(__name__)


@functools.cache
def decodable_formats() -> frozenset[str]:
    """Names of the image formats Pillow opens and decodes without an external program."""
    Image.init()  # loads every plugin, so the registry is complete
    return frozenset(
        name for name, (cls, _) in Image.OPEN.items()
        if name not in _NOT_DECODED and not (isinstance(cls, type) and issubclass(cls, ImageFile.StubImageFile))
    )


def default_extensions() -> tuple[str, ...]:
    """Every file suffix Pillow registers for a format it decodes (.png, .jpg, .gif, .bmp, .tif, .pgm, .webp,
    ...), from its registry rather than a hand list, so a Pillow that reads more formats reads more files."""
    formats = decodable_formats()
    return tuple(sorted(ext for ext, name in Image.registered_extensions().items() if name in formats))


class ImageFolderConfig(SourceConfig):
    root: Path = Field(description="Top of the tree.")
    extensions: tuple[str, ...] | None = Field(
        None, description="File suffixes read as images; None: every suffix of a format Pillow decodes."
    )
    identify_unknown: bool = Field(
        True, description="Files with no suffix or a suffix not in extensions: open them and read those that Pillow "
        "identifies as images by their content; the others are ignored. False: ignore them unread.",
    )
    labels: Literal["auto", "folders", "none"] = Field(
        "auto", description="folders: first-level subfolders are classes; auto: folders when every image is in one."
    )
    test_fraction: float = Field(
        0.0, ge=0, lt=1, description="Without train/test subfolders: share of files held out as a 'test' split, by a "
        "seeded permutation of the sorted file list (a file added or removed can move others between the splits). "
        "Kept for existing configs; ingest.test_fraction, by a hash of each file's path, is stable and works for "
        "every source."
    )
    seed: int = Field(0, description="Seed of the train/test assignment when test_fraction > 0.")


def _is_image(path: str) -> bool:
    """Whether Pillow identifies the file as an image it decodes; reads its header only."""
    try:
        with Image.open(path) as image:
            return image.format in decodable_formats()
    except Image.DecompressionBombError:  # identified, and too large: listed, to be rejected with its size when read
        return True
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):  # not an image, or not one Pillow knows
        return False


@functools.lru_cache(maxsize=8)
def _walk(root: str, extensions: tuple[str, ...], identify: bool) -> tuple[str, ...]:
    """Every image file under root, relative, sorted; cached per process (shard groups list it once)."""
    found, ignored = [], []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in filenames:
            if name.startswith("."):
                continue
            path = os.path.join(dirpath, name)
            if name.lower().endswith(extensions) or (identify and _is_image(path)):
                found.append(os.path.relpath(path, root))
            else:
                ignored.append(name)
    if ignored:
        log.info("imagefolder: ignored %d file(s) under %s that are not images (e.g. %s)", len(ignored), root,
                 ", ".join(sorted(ignored)[:3]))
    return tuple(sorted(found))


class ImageFolderSource(Source):
    name = "imagefolder"
    Config = ImageFolderConfig

    def _split_roots(self) -> dict[str, Path]:
        root = self.config.root
        if not root.is_dir():
            raise SourceError(f"imagefolder source: {root} is not a directory (missing or unreadable); set "
                              "source.options.root")
        present = {d: root / d for d in SPLIT_DIRS if (root / d).is_dir()}
        return present or {"": root}

    def _listing(self) -> dict[str, tuple[Path, list[str]]]:
        """Split -> (its root, its files relative to that root)."""
        extensions = tuple(e.lower() for e in (self.config.extensions or default_extensions()))
        identify = self.config.identify_unknown
        roots = self._split_roots()
        if "" not in roots:
            out = {split: (r, list(_walk(str(r), extensions, identify))) for split, r in roots.items()}
        else:
            files = list(_walk(str(roots[""]), extensions, identify))
            if self.config.test_fraction and files:
                order = np.random.default_rng(self.config.seed).permutation(len(files))
                n_test = max(1, int(round(len(files) * self.config.test_fraction)))
                test = set(order[:n_test].tolist())
                out = {
                    "train": (roots[""], [f for i, f in enumerate(files) if i not in test]),
                    "test": (roots[""], [f for i, f in enumerate(files) if i in test]),
                }
            else:
                out = {"train": (roots[""], files)}
        if not any(files for _, files in out.values()):
            kinds = "/".join(self.config.extensions) if self.config.extensions else "image"
            found_by = ", nor files Pillow identifies as images" if self.config.identify_unknown else ""
            raise SourceError(
                f"imagefolder source: no {kinds} files under {self.config.root}{found_by}; check "
                "source.options.root and source.options.extensions"
            )
        return out

    def _classes(self, listing: dict[str, tuple[Path, list[str]]]) -> list[str] | None:
        if self.config.labels == "none":
            return None
        in_folders = [os.sep in f for _, files in listing.values() for f in files]
        if self.config.labels == "auto" and not any(in_folders):
            return None
        if not all(in_folders):
            loose = sum(1 for x in in_folders if not x)
            raise SourceError(
                f"imagefolder source: {loose} image(s) lie directly under the root while others are in class "
                "subfolders; move them into a class folder, or set source.options.labels=none"
            )
        return sorted({f.split(os.sep, 1)[0] for _, files in listing.values() for f in files})

    def splits(self) -> list[str]:
        return [s for s, (_, files) in self._listing().items() if files]

    def num_records(self, split: str) -> int:
        self._check_split(split)
        return len(self._listing()[split][1])

    def records(self, split: str, start: int = 0, stop: int | None = None) -> Iterator[Record | Rejected]:
        self._check_split(split)
        listing = self._listing()
        classes = self._classes(listing)
        label_of = {name: i for i, name in enumerate(classes or [])}
        root, files = listing[split]
        for rel in files[start:stop]:
            try:
                data = (root / rel).read_bytes()
                image, kept_as = decode_source(data, self.max_pixels)
            except OSError as err:
                yield Rejected(rel, "unreadable", f"cannot be read: {err.strerror or err}")
                continue
            except BadImage as err:
                yield Rejected(rel, err.kind, str(err))
                continue
            label = label_of[rel.split(os.sep, 1)[0]] if classes else None
            yield Record(key=rel, image=image, label=label, encoded=data if kept_as else None, encoded_format=kept_as)

    def shapes(self, split: str) -> Counter[tuple[int, int, int]]:
        """(H, W, C) per file from its header (Pillow reads no pixels until asked), as the image will be decoded:
        EXIF rotations by 90 degrees swap H and W. Files Pillow cannot identify, and images over `max_pixels`, are
        left out (they are rejected, with their reason, when read)."""
        self._check_split(split)
        root, files = self._listing()[split]
        found: Counter[tuple[int, int, int]] = Counter()
        admit_pixels(self.max_pixels)
        for rel in files:
            try:
                with Image.open(root / rel) as image:
                    w, h = image.size
                    if w * h > self.max_pixels:
                        continue
                    if image.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8):  # transposed or rotated by 90 degrees
                        w, h = h, w
                    found[h, w, _channels(image)] += 1
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # unreadable, unknown, too large
                continue
        return found


_ORIENTATION = 0x0112  # the EXIF orientation tag


def _channels(image: Image.Image) -> int:
    """Channels the decoded image will have (pipeline.conform's conversions: palette, bilevel, CMYK, 16-bit)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        return 4
    return 1 if image.mode in ("1", "L", "I", "I;16", "I;16B", "I;16L", "F") else 3
