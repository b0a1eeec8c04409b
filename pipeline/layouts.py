"""Shard layouts: how records become tar samples, and how a reader finds and decodes them again.

One registry (`LAYOUTS`): the index's `layout` names an entry that holds both its writer and its reader, so no
other module branches on a layout's name.

- `packed` (small images): a tar member groups a block of up to `block_size` images as one uint8 array
  (n, H, W, C) in `.images.npy`, with `.labels.npy` (n,), `.factors.npy` (n, K), `.keys.json` and, when the
  records have captions, `.texts.json` (a list of n strings, in the order of `.keys.json`). One member
  per 784-byte image costs ~5k samples/s per core in tar and Python overhead; a block of 1,024 costs almost
  nothing, and a reader copies pixels straight from the file into its buffer (`readinto`).
- `encoded` (large images, photos): one sample per image, `.jpg`/`.png`/`.webp` with `.cls`, `.factors.npy`,
  `.key.txt` and the caption as `.txt` (webdataset's and img2dataset's name for it), so a plain
  `webdataset.WebDataset` sees image, key and caption. The source's own bytes are kept when the image needed no
  conversion (`Record.encoded`); others are encoded in the ingest's format and quality.
- `encoded-blocks` (photos, the default): `encoded`'s images, a block of them per tar sample: `.encoded.bin`
  holds the encoded files back to back, `.offsets.npy` (n + 1,) int64 where each begins (and the last ends),
  `.formats.json` each one's suffix, and `.labels.npy`, `.factors.npy`, `.keys.json`, `.texts.json` as `packed`.
  Tar frames every member with a 512-byte header and pads it to 512 bytes: on one ~10 kB photo per sample (3
  members) that is ~28% of the source bytes, on a block of ~1 MB about 1%. Still a WebDataset tar (a sample is a
  block).

A reader first builds a shard's `ShardTable` from the tar and .npy headers alone (where each sample's bytes
lie, its label and factors), checked against index.json; then it reads any sample by offset, so a rank or a
worker process reads exactly the samples it needs, in any order. Keys and captions are not in the table: a
layout's `annotations` reads them, shard by shard, for whoever carries them on (`pipeline.read_captions`).
"""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from pipeline.conform import BadImage, decode_image, encode_image
from pipeline.errors import ShardFormatError
from pipeline.npy import check_block, npy_bytes, npy_header, npy_view
from pipeline.records import Record

# torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec; they are the decoders DESIGN.md
# measured (2.2x Pillow for JPEG) and the ones with a batched GPU path, so they stay until TorchCodec ships one.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

# encoded members a reader decodes, by tar suffix -> the format name `Record.encoded_format` uses
IMAGE_SUFFIXES = {"jpg": "jpeg", "jpeg": "jpeg", "png": "png", "webp": "webp"}
SUFFIX_OF = {"jpeg": "jpg", "png": "png", "webp": "webp"}


def block_sample(split: str, number: int, records, images: dict[str, bytes]) -> dict[str, Any]:
    """One tar sample holding a block of records: their images (`images`, the layout's members), keys, and
    labels, factors and captions where the records have them."""
    sample: dict[str, Any] = {"__key__": f"{split}-block-{number:06d}", **images,
                              "keys.json": json.dumps([r.key for r in records]).encode()}
    if records[0].text is not None:
        sample["texts.json"] = json.dumps([r.text for r in records], ensure_ascii=False).encode()
    if records[0].label is not None:
        sample["labels.npy"] = npy_bytes(np.asarray([r.label for r in records], dtype=np.int64))
    if records[0].factors is not None:
        sample["factors.npy"] = npy_bytes(np.stack([np.asarray(r.factors, np.float32) for r in records]))
    return sample


@dataclass
class ShardTable:
    """Where each sample of one shard lies: byte offsets and sizes, and its label and factors."""

    offsets: np.ndarray  # int64 (n,): first byte of the sample's pixels (packed) or encoded file (encoded); (n, F)
    # for a latent sample's F arrays (pipeline.latents)
    sizes: np.ndarray  # int64 (n,)
    labels: np.ndarray | None  # int64 (n,)
    factors: np.ndarray | None  # float32 (n, K)
    suffixes: list[str] | None = None  # encoded: each sample's image suffix

    def __len__(self) -> int:
        return len(self.offsets)


def _all_or_none(parts: list[list[str] | None]) -> list[str] | None:
    if not parts or parts[0] is None:
        if any(p is not None for p in parts):
            raise ShardFormatError("some samples have captions and others do not")
        return None
    if any(p is None for p in parts):
        raise ShardFormatError("some samples have captions and others do not")
    return [t for p in parts for t in p]


def _concat(parts: list[np.ndarray | None]) -> np.ndarray | None:
    if not parts or parts[0] is None:
        return None
    if any(p is None for p in parts):
        raise ShardFormatError("some samples have labels or factors and others do not")
    return np.concatenate(parts)


class Layout:
    """A shard layout: the writer's samples and the reader's table and decoder."""

    name: ClassVar[str]
    decodes: ClassVar[bool]  # whether reading costs a decode per image (then worker processes pay off)
    block_bytes: ClassVar[int | None] = None  # blocks sized by bytes: the ingest fits images per block to this

    def per_write(self, block_size: int) -> int:
        """Records per tar sample."""
        raise NotImplementedError

    def sample(self, split: str, number: int, records: list[Record], options: WriteOptions) -> dict[str, Any]:
        raise NotImplementedError

    def table(self, f, name: str, image_shape: tuple[int, int, int]) -> ShardTable:
        """Scan an open shard file's headers into its table, checking each sample against `image_shape`."""
        raise NotImplementedError

    def decode(self, data: bytes | memoryview, suffix: str | None, image_shape: tuple[int, int, int]) -> torch.Tensor:
        """One sample's bytes -> uint8 (C, H, W)."""
        raise NotImplementedError

    def annotations(self, f) -> tuple[list[str], list[str] | None]:
        """An open shard's keys and captions (None when it has none), in sample order: what the table leaves out.
        A block layout's: from each block's `keys.json` and `texts.json`."""
        keys, texts = [], []
        with tarfile.open(fileobj=f, mode="r:") as tar:
            for key, found in member_groups(tar):
                if "keys.json" not in found:
                    raise ShardFormatError(f"holds a block {key} without keys.json (members: {sorted(found)})")
                block = json.loads(tar.extractfile(found["keys.json"]).read())
                keys += block
                texts.append(json.loads(tar.extractfile(found["texts.json"]).read()) if "texts.json" in found
                             else None)
                if texts[-1] is not None and len(texts[-1]) != len(block):
                    raise ShardFormatError(f"holds a block {key} of {len(block)} keys with {len(texts[-1])} captions")
        return keys, _all_or_none(texts)


@dataclass(frozen=True)
class WriteOptions:
    image_format: str = "jpeg"  # encoded: the format of images that are (re-)encoded
    quality: int = 95


class Packed(Layout):
    name = "packed"
    decodes = False

    def per_write(self, block_size: int) -> int:
        return block_size

    def sample(self, split, number, records, options):
        return block_sample(split, number, records, {"images.npy": npy_bytes(np.stack([r.image for r in records]))})

    def table(self, f, name, image_shape):
        sample_bytes = int(np.prod(image_shape))
        offsets, labels, factors = [], [], []
        f.seek(0, io.SEEK_END)
        size = f.tell()
        f.seek(0)
        with tarfile.open(fileobj=f, mode="r:") as tar:
            for key, found in member_groups(tar):
                if "images.npy" not in found:
                    raise ShardFormatError(f"holds a sample {key} with no images.npy (members: {sorted(found)})")
                member = found["images.npy"]
                f.seek(member.offset_data)
                shape, dtype, header = npy_header(f.read(min(member.size, 1024)))
                extras = {k: npy_view(tar.extractfile(found[k]).read()) if k in found else None
                          for k in ("labels.npy", "factors.npy")}
                n = check_block(key, shape, dtype, image_shape, extras["labels.npy"], extras["factors.npy"])
                start = member.offset_data + header
                if start + n * sample_bytes > size:
                    raise ShardFormatError(f"ends inside block {key} at byte {size} (truncated)")
                offsets.append(start + sample_bytes * np.arange(n, dtype=np.int64))
                labels.append(extras["labels.npy"])
                factors.append(extras["factors.npy"])
        offsets = np.concatenate(offsets) if offsets else np.zeros(0, np.int64)
        return ShardTable(offsets, np.full(len(offsets), sample_bytes, np.int64), _concat(labels), _concat(factors))

    def decode(self, data, suffix, image_shape):
        h, w, c = image_shape
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).reshape(h, w, c).permute(2, 0, 1)


class Encoded(Layout):
    name = "encoded"
    decodes = True

    def per_write(self, block_size: int) -> int:
        return 1

    def sample(self, split, number, records, options):
        (record,) = records
        suffix, data = stored(record, options)
        sample = {"__key__": f"{split}-{number:09d}", suffix: data, "key.txt": record.key}
        if record.label is not None:
            sample["cls"] = str(int(record.label))
        if record.factors is not None:
            sample["factors.npy"] = npy_bytes(np.asarray(record.factors, np.float32))
        if record.text is not None:
            sample["txt"] = record.text
        return sample

    def table(self, f, name, image_shape):
        offsets, sizes, suffixes, labels, factors = [], [], [], [], []
        with tarfile.open(fileobj=f, mode="r:") as tar:
            for key, found in member_groups(tar):
                image = [s for s in found if s in IMAGE_SUFFIXES]
                if len(image) != 1:
                    raise ShardFormatError(f"holds a sample {key} with {len(image)} images (members: {sorted(found)})")
                member = found[image[0]]
                offsets.append(member.offset_data)
                sizes.append(member.size)
                suffixes.append(image[0])
                labels.append(int(tar.extractfile(found["cls"]).read()) if "cls" in found else None)
                factors.append(npy_view(tar.extractfile(found["factors.npy"]).read()) if "factors.npy" in found
                               else None)
        if len({x is None for x in labels}) > 1 or len({x is None for x in factors}) > 1:
            raise ShardFormatError("some samples have labels or factors and others do not")
        return ShardTable(
            np.asarray(offsets, np.int64), np.asarray(sizes, np.int64),
            None if not labels or labels[0] is None else np.asarray(labels, np.int64),
            None if not factors or factors[0] is None else np.stack(factors).astype(np.float32),
            suffixes,
        )

    def annotations(self, f):
        keys, texts = [], []
        with tarfile.open(fileobj=f, mode="r:") as tar:
            for key, found in member_groups(tar):
                if "key.txt" not in found:
                    raise ShardFormatError(f"holds a sample {key} without key.txt (members: {sorted(found)})")
                keys.append(tar.extractfile(found["key.txt"]).read().decode())
                texts.append([tar.extractfile(found["txt"]).read().decode()] if "txt" in found else None)
        return keys, _all_or_none(texts)

    def decode(self, data, suffix, image_shape):
        image = decode_tensor(bytes(data), image_shape[2])
        if tuple(image.shape) != (image_shape[2], *image_shape[:2]):
            c, h, w = image.shape
            raise ShardFormatError(f"holds an image of shape {(h, w, c)}, but index.json says {tuple(image_shape)}")
        return image


class EncodedBlocks(Encoded):
    name = "encoded-blocks"
    block_bytes = 1 << 20  # a block holds about this many encoded bytes (the ingest picks the images per block)
    annotations = Layout.annotations  # keys and captions per block, as packed

    def per_write(self, block_size: int) -> int:
        return block_size

    def sample(self, split, number, records, options):
        files = [stored(record, options) for record in records]
        return block_sample(split, number, records, {
            "encoded.bin": b"".join(data for _, data in files),
            "offsets.npy": npy_bytes(np.cumsum([0] + [len(data) for _, data in files], dtype=np.int64)),
            "formats.json": json.dumps([suffix for suffix, _ in files]).encode(),
        })

    def table(self, f, name, image_shape):
        offsets, sizes, suffixes, labels, factors = [], [], [], [], []
        with tarfile.open(fileobj=f, mode="r:") as tar:
            for key, found in member_groups(tar):
                missing = {"encoded.bin", "offsets.npy", "formats.json"} - set(found)
                if missing:
                    raise ShardFormatError(f"holds a block {key} without {sorted(missing)} (members: {sorted(found)})")
                ends = npy_view(tar.extractfile(found["offsets.npy"]).read())
                formats = json.loads(tar.extractfile(found["formats.json"]).read())
                n = len(ends) - 1
                blob = found["encoded.bin"]
                if (ends.dtype != np.int64 or ends.ndim != 1 or n < 1 or ends[0] != 0 or np.any(np.diff(ends) <= 0)
                        or ends[-1] != blob.size):
                    raise ShardFormatError(f"holds a block {key} whose offsets do not cut its {blob.size} encoded "
                                           "bytes into images (corrupt offsets.npy)")
                if not isinstance(formats, list) or len(formats) != n or not set(formats) <= set(IMAGE_SUFFIXES):
                    raise ShardFormatError(f"holds a block {key} whose formats.json does not name one of "
                                           f"{sorted(IMAGE_SUFFIXES)} for each of its {n} images")
                extras = {k: npy_view(tar.extractfile(found[k]).read()) if k in found else None
                          for k in ("labels.npy", "factors.npy")}
                for k, value in extras.items():
                    if value is not None and len(value) != n:
                        raise ShardFormatError(f"holds a block {key} of {n} images with {len(value)} {k}")
                offsets.append(blob.offset_data + ends[:-1])
                sizes.append(np.diff(ends))
                suffixes += formats
                labels.append(extras["labels.npy"])
                factors.append(extras["factors.npy"])
        empty = np.zeros(0, np.int64)
        return ShardTable(np.concatenate(offsets) if offsets else empty, np.concatenate(sizes) if sizes else empty,
                          _concat(labels), _concat(factors), suffixes)


def stored(record: Record, options: WriteOptions) -> tuple[str, bytes]:
    """(suffix, bytes) a shard stores for a record: the source's own bytes when it needed no conversion."""
    if record.encoded is not None and record.encoded_format in SUFFIX_OF:
        return SUFFIX_OF[record.encoded_format], record.encoded
    return SUFFIX_OF[options.image_format], encode_image(record.image, options.image_format, options.quality)


def load_decoders() -> None:
    """Import torchvision's codecs in this process, before loader workers fork from it: a worker that imports
    them itself on its first decode pays ~2.3 s, and workers are forked anew each epoch (measured: 3-4 s to an
    epoch's first batch with 1-2 workers, against 0.2 s to decode one; bench/LOG.md, 2026-12-06)."""
    import torchvision.io  # noqa: F401


def decode_tensor(data: bytes, channels: int) -> torch.Tensor:
    """Encoded image bytes -> uint8 (C, H, W) with `channels` channels.

    torchvision's decoder (libjpeg-turbo, libpng, libwebp) is used because it is ~2.2x Pillow's speed for JPEG
    on one core (DESIGN.md facts); what it cannot read is decoded by Pillow with the ingest's rules. Corrupt
    data raises BadImage either way.
    """
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as tv_decode

    mode = {1: ImageReadMode.GRAY, 3: ImageReadMode.RGB, 4: ImageReadMode.RGB_ALPHA}[channels]
    try:
        return tv_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)
    except RuntimeError:
        array = decode_image(data)  # Pillow; raises BadImage for corrupt data
        if array.shape[2] != channels:
            raise BadImage("channels", f"decoded {array.shape[2]} channels, expected {channels}") from None
        return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)


def member_groups(tar: tarfile.TarFile):
    """(key, {suffix: member}) per sample, as webdataset groups members: by the name up to the first dot."""
    key, found = None, {}
    for member in tar:
        if not member.isreg():
            continue
        member_key, _, suffix = member.name.partition(".")
        if found and member_key != key:
            yield key, found
            found = {}
        key = member_key
        found[suffix] = member
    if found:
        yield key, found


LAYOUTS: dict[str, Callable[[], Layout]] = {"packed": Packed, "encoded": Encoded, "encoded-blocks": EncodedBlocks}
# what ingest.layout takes: a layout, or "auto" (packed for small images, encoded-blocks above: shards.choose_layout)
LayoutChoice = Literal["auto", "packed", "encoded", "encoded-blocks"]


def get_layout(name: str) -> Layout:
    """The layout registered under `name`; an unknown one is refused, listing the known ones."""
    if name not in LAYOUTS:
        raise ShardFormatError(f"unknown shard layout {name!r}; this vaepipe reads {sorted(LAYOUTS)}: re-ingest")
    return LAYOUTS[name]()
