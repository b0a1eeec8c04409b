"""Shard format, version 1: WebDataset tar shards plus an `index.json` written last.

The shards are ordinary WebDataset shards that `webdataset.WebDataset(url).decode()` and GNU tar read, in one of
the layouts of `pipeline.layouts` (packed blocks of small images, or one encoded image per sample); the index
names the layout, and the layout's entry writes and reads them.

`index.json` records the layout, per split the shards with sample count, bytes and sha256, the image shape,
and the skipped inputs per reason (each one is listed in `skipped.jsonl` beside the shards).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import webdataset as wds
from pydantic import BaseModel, Field, ValidationError, field_validator

from pipeline.errors import ShardFormatError, SourceError
from pipeline.layouts import LAYOUTS, LayoutChoice, WriteOptions, get_layout
from pipeline.records import Record
from pipeline.storage import Location

FORMAT_NAME = "vaepipe-shards"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
REPORT_NAME = "skipped.jsonl"
# "auto" packs images up to this many bytes (64x64x3 = 12,288: CIFAR, dSprites, MNIST) and encodes larger ones
PACKED_MAX_IMAGE_BYTES = 16384
ImageFormat = Literal["png", "jpeg", "webp"]


# A shard is a plain file in its directory: an index naming "../x" or "/etc/x" must not read outside it.
SHARD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*\.tar")


class ShardInfo(BaseModel):
    name: str
    num_samples: int
    bytes: int
    sha256: str

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if not SHARD_NAME.fullmatch(name):
            raise ValueError(f"shard name {name!r} must be a plain file name ending in .tar, in the shard directory")
        return name


class SplitInfo(BaseModel):
    num_samples: int
    shards: list[ShardInfo]
    num_classes: int | None = Field(None, description="1 + the largest label, when the split has labels.")
    num_factors: int | None = Field(None, description="K of the per-sample factors (K,), when the split has them.")
    captions: bool = Field(False, description="Whether every sample has a caption (stored beside its key).")
    skipped: dict[str, int] = Field(default_factory=dict, description="Reason -> inputs skipped in this split.")


class HeldOut(BaseModel, frozen=True):
    """A validation split the ingest held out of a source split (ingest.test_fraction): which inputs went there is
    a function of each one's key and the seed alone, so a re-ingest, in any order or grouping, sends each key to
    the same split."""

    split: str = Field("test", description="The held-out split.")
    source_split: str = Field(description="The source's split it was taken from (the rest keeps that name).")
    fraction: float = Field(description="Share of the inputs held out: each key with hash(seed, key) below it.")
    seed: int = 0

    def split_of(self, key: str) -> str:
        """The split an input of `source_split` goes to: the first 8 bytes of sha256(seed, key) as a fraction of
        2^64, held out when below `fraction` (uniform over keys, and independent of every other input)."""
        digest = hashlib.sha256(f"{self.seed}\0{key}".encode()).digest()
        return self.split if int.from_bytes(digest[:8], "big") < self.fraction * 2**64 else self.source_split


class ShardIndex(BaseModel):
    """The content of `index.json`; its presence marks the directory complete."""

    format: Literal["vaepipe-shards"] = FORMAT_NAME
    version: int = FORMAT_VERSION
    created: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    source: dict[str, Any] = Field(description="{'name': ..., 'config': {...}} of the source that wrote it.")
    layout: str = Field("packed", description="The layout's name in pipeline.layouts.LAYOUTS.")
    image_format: ImageFormat | None = Field(
        None, description="Encoding of the images the ingest encoded (encoded layout); images kept as the source "
        "stored them keep their own format, named by their tar suffix."
    )
    block_size: int
    image_shape: tuple[int, int, int] = Field(description="(H, W, C) of every image.")
    dtype: Literal["uint8"] = "uint8"
    splits: dict[str, SplitInfo]
    factor_names: list[str] | None = Field(None, description="Names of the factors, when the source knows them.")
    held_out: HeldOut | None = Field(None, description="The split the ingest held out (ingest.test_fraction), if any.")
    skipped: dict[str, int] = Field(default_factory=dict, description="Reason -> number of inputs skipped.")
    skipped_report: str | None = Field(None, description=f"File listing every skipped input ({REPORT_NAME}).")

    @field_validator("layout")
    @classmethod
    def _known_layout(cls, layout: str) -> str:
        if layout not in LAYOUTS:
            raise ValueError(f"unknown shard layout {layout!r}; this vaepipe reads {sorted(LAYOUTS)}")
        return layout

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise ShardFormatError(f"the shard index has no split {name!r}; it has {sorted(self.splits)}")
        return self.splits[name]


class ShardPlan(BaseModel, frozen=True):
    """How a split's records become shards; every shard group of one ingest shares it."""

    layout: str
    image_format: ImageFormat = "jpeg"
    quality: int = 95
    samples_per_shard: int
    block_size: int
    image_shape: tuple[int, int, int]

    @property
    def per_write(self) -> int:
        return get_layout(self.layout).per_write(self.block_size)


def choose_layout(requested: LayoutChoice, shape: tuple[int, int, int]) -> str:
    """'auto': packed blocks for images up to PACKED_MAX_IMAGE_BYTES, blocks of encoded images above (one
    encoded image per sample costs its photo ~28% in tar framing at 256 px, a block ~1%: bench/LOG.md)."""
    if requested != "auto":
        return requested
    return "packed" if int(np.prod(shape)) <= PACKED_MAX_IMAGE_BYTES else "encoded-blocks"


def sha256_of(location: Location, name: str) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with location.open(name) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


@dataclass
class WrittenShards:
    shards: list[ShardInfo]
    max_label: int  # -1 when unlabelled
    has_labels: bool | None  # None: no records
    num_factors: int | None
    captions: bool | None = None  # None: no records


class _LabelCheck:
    """Labels, factors and captions must be present on every record or on none: a mix would lose data silently."""

    def __init__(self) -> None:
        self.has_labels: bool | None = None
        self.num_factors: int | None = None
        self.captions: bool | None = None
        self.max_label = -1
        self.first = True

    def __call__(self, record: Record) -> None:
        has_label = record.label is not None
        factors = None if record.factors is None else len(record.factors)
        if self.first:
            self.has_labels, self.num_factors, self.first = has_label, factors, False
            self.captions = record.text is not None
        elif has_label != self.has_labels or factors != self.num_factors:
            raise SourceError(
                f"record {record.key!r} has label={record.label!r}, factors of length {factors}, but earlier records "
                f"have {'labels' if self.has_labels else 'no labels'} and factors of length {self.num_factors}; "
                "a source must give labels (and factors) for every record or for none"
            )
        elif (record.text is not None) != self.captions:
            raise SourceError(captions_mixed(f"record {record.key!r}"))
        if has_label:
            self.max_label = max(self.max_label, int(record.label))


def captions_mixed(where: str) -> str:
    """The message for a split where some records have a caption and others do not."""
    return (f"{where}: some records have a caption and others do not; a source gives a caption to every record or "
            "to none (the webdataset source: set source.options.caption_key to a member every sample has, or to "
            "null to store no captions)")


class SplitWriter:
    """Conformed records of one split -> its shards numbered from `first_shard` (webdataset's ShardWriter, each
    shard checksummed in its post hook), a tar sample per `plan.per_write` records. A context manager: `written`
    is set when the block ends without an error; after an error the partial shard stays for the re-run to replace.

    A local destination is written in place; any other is staged in a temporary directory and uploaded shard
    by shard. Records must already have `plan.image_shape` (see `pipeline.conform`). A shard group writes one
    split, or two at once (its own and the held-out one): records are routed one by one, so each is read once.
    """

    def __init__(self, location: Location, split: str, first_shard: int, plan: ShardPlan) -> None:
        if plan.samples_per_shard % plan.per_write:
            raise ValueError(
                f"ingest.samples_per_shard ({plan.samples_per_shard}) must be a multiple of the {plan.layout} "
                f"layout's samples per tar sample ({plan.per_write}: ingest.block_size)"
            )
        self.location, self.split, self.plan = location, split, plan
        self.shards: list[ShardInfo] = []
        self.pending = 0  # samples written to the shard that is open now
        self.block: list[Record] = []
        self.check = _LabelCheck()
        self.layout = get_layout(plan.layout)
        self.options = WriteOptions(image_format=plan.image_format, quality=plan.quality)
        self.number = first_shard * (plan.samples_per_shard // plan.per_write)  # the next tar sample's number
        self.staging = None if location.local else tempfile.TemporaryDirectory(prefix="vaepipe-shards-")
        self.written: WrittenShards | None = None
        self.writer = wds.ShardWriter(
            str(Path(self.staging.name if self.staging else location.root) / f"{split}-%06d.tar"),
            maxcount=plan.samples_per_shard // plan.per_write, maxsize=float("inf"), post=self._closed,
            start_shard=first_shard, verbose=0,
        )

    def add(self, record: Record) -> None:
        if record.image.shape != self.plan.image_shape:
            raise SourceError(
                f"record {record.key!r} has shape {record.image.shape}, but this dataset's images are "
                f"{self.plan.image_shape}; set ingest.size_rule / ingest.channel_rule to fit or skip such images"
            )
        self.check(record)
        self.block.append(record)
        if len(self.block) == self.plan.per_write:
            self._flush()

    def _flush(self) -> None:
        if self.block:
            self.writer.write(self.layout.sample(self.split, self.number, self.block, self.options))
            self.number += 1
            self.pending += len(self.block)
            self.block = []

    def _closed(self, fname: str) -> None:  # ShardWriter's post= hook, called as each shard closes
        name = Path(fname).name
        if self.pending == 0:  # ShardWriter opens its first file eagerly; an empty group leaves nothing behind
            os.unlink(fname)
            return
        digest, size = sha256_of(Location(Path(fname).parent), name)
        self.location.put(fname, name)
        self.shards.append(ShardInfo(name=name, num_samples=self.pending, bytes=size, sha256=digest))
        self.pending = 0

    def __enter__(self) -> SplitWriter:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        try:
            if kind is None:
                self._flush()
        finally:
            self.writer.close()
            if self.staging is not None:
                self.staging.cleanup()
        if kind is None:
            check = self.check
            self.written = WrittenShards(self.shards, check.max_label, check.has_labels, check.num_factors,
                                         check.captions)


def write_shards(
    records: Iterable[Record], location: Location, split: str, first_shard: int, plan: ShardPlan
) -> WrittenShards:
    """Write conformed records of one split as shards numbered from `first_shard` (see `SplitWriter`)."""
    with SplitWriter(location, split, first_shard, plan) as sink:
        for record in records:
            sink.add(record)
    return sink.written


def write_split(
    records: Iterable[Record], out_dir: Path, split: str, samples_per_shard: int, block_size: int
) -> tuple[SplitInfo, tuple[int, int, int]]:
    """One split of same-shape records as packed shards from number 0 (no policies): for tests and tools."""
    records = iter(records)
    first = next(records, None)
    if first is None:
        raise SourceError(f"split {split!r} of the source yielded no images; check the source's path and options")
    location = Location(out_dir)
    for stale in location.glob(f"{split}-*.tar"):
        location.remove(stale)
    plan = ShardPlan(layout="packed", samples_per_shard=samples_per_shard, block_size=block_size,
                     image_shape=first.image.shape)
    written = write_shards(_prepend(first, records), location, split, 0, plan)
    num_classes = written.max_label + 1 if written.has_labels else None
    info = SplitInfo(num_samples=sum(s.num_samples for s in written.shards), shards=written.shards,
                     num_classes=num_classes, num_factors=written.num_factors, captions=bool(written.captions))
    return info, tuple(first.image.shape)


def _prepend(first: Record, rest: Iterator[Record]) -> Iterator[Record]:
    yield first
    yield from rest


def write_index(out_dir: str | os.PathLike | Location, index: ShardIndex) -> str:
    """Write `index.json` last and whole (see pipeline.storage): only now is the directory complete."""
    location = out_dir if isinstance(out_dir, Location) else Location(out_dir)
    location.write_text(INDEX_NAME, index.model_dump_json(indent=2))
    return location.display(INDEX_NAME)


def index_sha256(shard_dir: str | os.PathLike | Location, storage_options: dict | None = None) -> str:
    """sha256 of the directory's index.json bytes (what `sha256sum index.json` prints). The index holds every
    shard's own sha256, so this one hash pins the exact data: provenance tags and cache keys use it."""
    location = shard_dir if isinstance(shard_dir, Location) else Location(shard_dir, storage_options)
    with location.open(INDEX_NAME) as f:
        return hashlib.sha256(f.read()).hexdigest()


def read_index(shard_dir: str | os.PathLike | Location, storage_options: dict | None = None) -> ShardIndex:
    """Read and check a shard directory's index; refuse a missing, incomplete or foreign directory."""
    location = shard_dir if isinstance(shard_dir, Location) else Location(shard_dir, storage_options)
    if not location.exists():
        raise ShardFormatError(f"shard directory {location} does not exist; run the ingest first (vaepipe ingest)")
    if not location.isfile(INDEX_NAME):
        tars = location.glob("*.tar")
        state = (
            f"it holds {len(tars)} tar file(s) but no {INDEX_NAME}, so an ingest was interrupted"
            if tars
            else f"it has no {INDEX_NAME} and no shards"
        )
        raise ShardFormatError(
            f"{location} is not a complete shard directory: {state}. Re-run the ingest into it (vaepipe ingest)."
        )
    path = location.display(INDEX_NAME)
    try:
        raw = json.loads(location.read_text(INDEX_NAME))
    except json.JSONDecodeError as err:
        raise ShardFormatError(f"{path} is not valid JSON ({err}); re-run the ingest") from None
    if not isinstance(raw, dict):
        raise ShardFormatError(f"{path} holds a JSON {_json_kind(raw)}, not an object; re-run the ingest")
    if raw.get("format") != FORMAT_NAME or raw.get("version") != FORMAT_VERSION:
        raise ShardFormatError(
            f"{path}: format {raw.get('format')!r} version {raw.get('version')!r} is not "
            f"{FORMAT_NAME!r} version {FORMAT_VERSION}; re-ingest with this vaepipe"
        )
    try:
        return ShardIndex.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ShardFormatError(f"{path} is malformed ({problems}); re-run the ingest") from None


def _json_kind(value: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(value), "null")


def check_shard(location: Location, info: ShardInfo) -> str | None:
    """None when the shard matches its index entry, else what is wrong with it."""
    if not location.isfile(info.name):
        return f"{info.name}: missing"
    digest, size = sha256_of(location, info.name)
    if size != info.bytes:
        return f"{info.name}: {size} bytes, index.json says {info.bytes} (truncated or replaced)"
    if digest != info.sha256:
        return f"{info.name}: sha256 {digest[:12]}... does not match index.json's {info.sha256[:12]}... (corrupt)"
    return None


def verify(shard_dir: str | os.PathLike | Location, storage_options: dict | None = None) -> list[str]:
    """Check every shard of a complete directory against index.json; return one line per bad shard."""
    location = shard_dir if isinstance(shard_dir, Location) else Location(shard_dir, storage_options)
    index = read_index(location)
    problems = []
    for info in (s for split in index.splits.values() for s in split.shards):
        problem = check_shard(location, info)
        if problem:
            problems.append(problem)
    return problems
