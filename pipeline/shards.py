"""Shard format, version 1: packed WebDataset tar shards plus an `index.json` written last.

A tar member groups a *block* of up to `block_size` images as one uint8 array (n, H, W, C) in `.images.npy`,
with `.labels.npy` (n,) when the source has labels and `.keys.json` naming each image. One member per
784-byte image costs ~5k samples/s per core in tar and Python overhead; a block of 1,024 costs almost
nothing. The files are ordinary WebDataset shards: `webdataset.WebDataset(url).decode()` and GNU tar read them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import webdataset as wds
from pydantic import BaseModel, Field, ValidationError

from pipeline.errors import ShardFormatError, SourceError
from pipeline.records import Record

FORMAT_NAME = "vaepipe-shards"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"


class ShardInfo(BaseModel):
    name: str
    num_samples: int
    bytes: int
    sha256: str


class SplitInfo(BaseModel):
    num_samples: int
    shards: list[ShardInfo]
    num_classes: int | None = Field(None, description="1 + the largest label, when the split has labels.")


class ShardIndex(BaseModel):
    """The content of `index.json`; its presence marks the directory complete."""

    format: Literal["vaepipe-shards"] = FORMAT_NAME
    version: int = FORMAT_VERSION
    created: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    source: dict[str, Any] = Field(description="{'name': ..., 'config': {...}} of the source that wrote it.")
    layout: Literal["packed"] = "packed"
    block_size: int
    image_shape: tuple[int, int, int] = Field(description="(H, W, C) of every image.")
    dtype: Literal["uint8"] = "uint8"
    splits: dict[str, SplitInfo]
    skipped: dict[str, int] = Field(default_factory=dict, description="Reason -> number of inputs skipped.")

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise ShardFormatError(f"the shard index has no split {name!r}; it has {sorted(self.splits)}")
        return self.splits[name]


def shard_pattern(out_dir: Path, split: str) -> str:
    return str(out_dir / f"{split}-%06d.tar")


def _sha256(path: str) -> tuple[str, int]:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest(), os.path.getsize(path)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _blocks(records: Iterable[Record], block_size: int) -> Iterator[list[Record]]:
    block: list[Record] = []
    for record in records:
        block.append(record)
        if len(block) == block_size:
            yield block
            block = []
    if block:
        yield block


def write_split(
    records: Iterable[Record], out_dir: Path, split: str, samples_per_shard: int, block_size: int
) -> tuple[SplitInfo, tuple[int, int, int]]:
    """Write one split's records as packed shards; return its index entry and the image shape.

    Every image must have the first record's shape: a mixed-size source is an error naming the record.
    """
    if samples_per_shard % block_size:
        raise ValueError(
            f"ingest.samples_per_shard ({samples_per_shard}) must be a multiple of ingest.block_size ({block_size})"
        )
    for stale in out_dir.glob(f"{split}-*.tar"):  # leftovers of an interrupted run; never mixed with new shards
        stale.unlink()
    shards: list[ShardInfo] = []
    pending = 0  # samples written to the shard that is open now

    def on_shard_closed(fname: str) -> None:  # ShardWriter's post= hook, called as each shard closes
        nonlocal pending
        digest, size = _sha256(fname)
        shards.append(ShardInfo(name=Path(fname).name, num_samples=pending, bytes=size, sha256=digest))
        pending = 0

    shape: tuple[int, int, int] | None = None
    max_label = -1
    has_labels = True
    writer = wds.ShardWriter(
        shard_pattern(out_dir, split), maxcount=samples_per_shard // block_size, maxsize=float("inf"),
        post=on_shard_closed, verbose=0,
    )
    try:
        for number, block in enumerate(_blocks(records, block_size)):
            shape = shape or block[0].image.shape
            for record in block:
                if record.image.shape != shape:
                    raise SourceError(
                        f"record {record.key!r} has shape {record.image.shape}, but this split's images are {shape}; "
                        "packed shards need one image size"
                    )
            sample = {
                "__key__": f"{split}-block-{number:06d}",
                "images.npy": _npy_bytes(np.stack([r.image for r in block])),
                "keys.json": json.dumps([r.key for r in block]).encode(),
            }
            labels = [r.label for r in block]
            has_labels = has_labels and all(label is not None for label in labels)
            if has_labels:
                sample["labels.npy"] = _npy_bytes(np.asarray(labels, dtype=np.int64))
                max_label = max(max_label, *labels)
            writer.write(sample)
            pending += len(block)
    finally:
        writer.close()
    if shape is None:
        for empty in out_dir.glob(f"{split}-*.tar"):
            empty.unlink()
        raise SourceError(f"split {split!r} of the source yielded no images; check the source's path and options")
    num_classes = max_label + 1 if has_labels else None
    info = SplitInfo(num_samples=sum(s.num_samples for s in shards), shards=shards, num_classes=num_classes)
    return info, tuple(shape)


def write_index(out_dir: Path, index: ShardIndex) -> Path:
    """Write `index.json` atomically (temporary name, then rename): only now is the directory complete."""
    path = out_dir / INDEX_NAME
    tmp = out_dir / f".{INDEX_NAME}.tmp"
    tmp.write_text(index.model_dump_json(indent=2))
    os.replace(tmp, path)
    return path


def read_index(shard_dir: str | os.PathLike) -> ShardIndex:
    """Read and check a shard directory's index; refuse a missing, incomplete or foreign directory."""
    shard_dir = Path(shard_dir)
    if not shard_dir.exists():
        raise ShardFormatError(f"shard directory {shard_dir} does not exist; run the ingest first (vaepipe ingest)")
    path = shard_dir / INDEX_NAME
    if not path.is_file():
        tars = sorted(p.name for p in shard_dir.glob("*.tar"))
        state = (
            f"it holds {len(tars)} tar file(s) but no {INDEX_NAME}, so an ingest was interrupted"
            if tars
            else f"it has no {INDEX_NAME} and no shards"
        )
        raise ShardFormatError(
            f"{shard_dir} is not a complete shard directory: {state}. Re-run the ingest into it (vaepipe ingest)."
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ShardFormatError(f"{path} is not valid JSON ({err}); re-run the ingest") from None
    if raw.get("format") != FORMAT_NAME or raw.get("version") != FORMAT_VERSION:
        raise ShardFormatError(
            f"{path}: format {raw.get('format')!r} version {raw.get('version')!r} is not "
            f"{FORMAT_NAME!r} version {FORMAT_VERSION}; re-ingest with this vaepipe"
        )
    try:
        return ShardIndex.model_validate(raw)
    except ValidationError as err:
        raise ShardFormatError(f"{path} is malformed: {err}") from None
