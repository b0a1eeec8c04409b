"""Step 1 of an ingest, once: `plan_ingest` decides the splits, the target image shape (the config's, or the most
common among the inputs), the layout, the samples per shard, and per split the shard groups, record ranges of
`shards_per_task * samples_per_shard` inputs that one task each writes. A split the source cannot count is
written by one task per part the source names (`Source.parts`: its input files), else by one task.

A split held out by ingest.test_fraction has no groups of its own: each group of the split it is taken from
writes both, routing every input by its key (`pipeline.shards.HeldOut`), so each input is read and decoded once."""

from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from pipeline import shards
from pipeline.conform import conform, encode_image
from pipeline.errors import SourceError
from pipeline.layouts import get_layout
from pipeline.records import Record
from pipeline.settings import IngestSection
from pipeline.shards import HeldOut, ShardPlan
from pipeline.sources import build_source, validate_options
from pipeline.storage import Location

log = logging.getLogger(__name__)

ESTIMATE_SAMPLES = 32  # encoded images whose size sets the samples per shard (the largest, so shards stay under)
TAR_FRAMING = 2048  # a sample's tar headers and padding: about 3 members of 512 + padding
TAR_RECORD = 10240  # tar's record: a file's size is a multiple of it
# shard numbers of each part of an uncounted split: part g writes shards g * PART_SHARDS on, as many as it fills
# (unknown when planned) up to this many; at 8192 images or 256 MB a shard, far more than one input file holds
PART_SHARDS = 1000


class GroupTask(BaseModel, frozen=True):
    """One shard group: the inputs [start, stop) of a split, or all of one of its parts, written as shards from
    number `first_shard` on."""

    split: str
    group: int
    start: int
    stop: int | None  # None: to the end of the split, or of the part (a source that cannot count its inputs)
    first_shard: int
    part: str | None = None  # the part of an uncounted split (`Source.parts`) this group reads, start=0, stop=None


class IngestPlan(BaseModel, frozen=True):
    """Everything a group task needs, whichever worker runs it."""

    source: dict[str, Any]  # {'name', 'config'} as index.json stores it
    out: str  # local path or fsspec URL
    options: IngestSection
    shard: ShardPlan
    splits: list[str]  # the splits written: the source's, and the held-out one
    factor_names: list[str] | None
    groups: list[GroupTask]
    held_out: HeldOut | None = None
    warnings: list[str] = Field(default_factory=list)  # for the person running the ingest: logged, not fatal

    def location(self) -> Location:
        return Location(self.out, self.options.storage_options)

    def outputs(self, split: str) -> list[str]:
        """The splits a group of source split `split` writes."""
        held = self.held_out
        return [split, held.split] if held is not None and held.source_split == split else [split]

    def split_of(self, split: str, key: str) -> str:
        """The split an input of source split `split` goes to."""
        held = self.held_out
        return held.split_of(key) if held is not None and held.source_split == split else split


def source_record(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The source as `index.json` stores it: name and the validated, JSON-safe config."""
    return {"name": name, "config": validate_options(name, options).model_dump(mode="json")}


def _first_image(source, splits: list[str]) -> Record:
    for split in splits:
        for item in source.records(split):
            if isinstance(item, Record):
                return item
    raise SourceError(
        f"source {source.name!r} yielded no readable image in splits {splits}; check its path and options "
        "(an empty folder, a wrong root, or only unreadable files)"
    )


def plan_ingest(name: str, options: dict[str, Any], out_dir: str | os.PathLike, opts: IngestSection) -> IngestPlan:
    """Splits, target shape, layout and shard groups (see the module docstring)."""
    source = build_source(name, options, opts.max_pixels)
    splits = source.splits()
    if not splits:
        raise SourceError(f"source {name!r} has no splits; check its options")
    warnings: list[str] = []
    held_out = _held_out(name, splits, opts, warnings)
    if len(splits) == 1 and held_out is None:
        warnings.append(
            f"source {name!r} gave only the split {splits[0]!r}: training needs a training and a validation split "
            "(data.train_split, data.val_split). Hold some out at ingest (--ingest.test_fraction 0.1), or point both "
            "at this split when training"
        )
    shape = _target_shape(source, splits, opts)
    layout = shards.choose_layout(opts.layout, shape)
    per_shard, block_size = _shard_sizes(source, splits, opts, shape, layout)
    if per_shard < opts.samples_per_shard:
        log.info("%d samples per shard (of ingest.samples_per_shard %d) keep shards under ingest.shard_bytes %d",
                 per_shard, opts.samples_per_shard, opts.shard_bytes)
    per_group = opts.shards_per_task * per_shard
    groups = []
    for split in splits:
        count = source.num_records(split)
        if count == 0:
            raise SourceError(f"split {split!r} of source {name!r} has no inputs; check the source's path and options")
        groups += _split_groups(source, split, count, per_group, opts.shards_per_task)
    return IngestPlan(
        source=source_record(name, options),
        out=str(Location(out_dir, opts.storage_options)),
        options=opts,
        shard=ShardPlan(layout=layout, image_format=opts.image_format, quality=opts.quality,
                        samples_per_shard=per_shard,
                        block_size=block_size, image_shape=shape),
        splits=splits + ([held_out.split] if held_out else []),
        factor_names=list(source.factor_names) or None,
        groups=groups,
        held_out=held_out,
        warnings=warnings,
    )


def _split_groups(source, split: str, count: int | None, per_group: int, shards_per_task: int) -> list[GroupTask]:
    """A counted split's groups of `per_group` inputs; an uncounted one's group per part (from shard g *
    PART_SHARDS), or its one group when the source names fewer than two parts."""
    if count is not None:
        return [GroupTask(split=split, group=g, start=a, stop=min(a + per_group, count),
                          first_shard=g * shards_per_task) for g, a in enumerate(range(0, count, per_group))]
    parts = source.parts(split)
    if len(parts) < 2:
        return [GroupTask(split=split, group=0, start=0, stop=None, first_shard=0)]
    return [GroupTask(split=split, group=g, start=0, stop=None, first_shard=g * PART_SHARDS, part=part)
            for g, part in enumerate(parts)]


def _held_out(name: str, splits: list[str], opts: IngestSection, warnings: list[str]) -> HeldOut | None:
    """The split ingest.test_fraction holds out, or None: when it is 0, or the source has several splits and
    ingest.test_from names none of them (then a warning says it was not applied)."""
    if not opts.test_fraction:
        return None
    source_split = opts.test_from or (splits[0] if len(splits) == 1 else None)
    if source_split is None:
        warnings.append(f"ingest.test_fraction {opts.test_fraction} is not applied: source {name!r} has its own splits "
                        f"{splits}; set ingest.test_from to the split to hold 'test' out of")
        return None
    if source_split not in splits:
        raise SourceError(f"ingest.test_from {source_split!r} is not a split of source {name!r}; it has {splits}")
    held_out = HeldOut(source_split=source_split, fraction=opts.test_fraction, seed=opts.test_seed)
    if held_out.split in splits:
        raise SourceError(
            f"source {name!r} has its own split {held_out.split!r}, so ingest.test_fraction cannot hold out another "
            f"of that name from {source_split!r}: set ingest.test_fraction 0 and validate on the source's own (or on "
            "this split, with --data.train_split and --data.val_split naming it)"
        )
    return held_out


def _shard_sizes(source, splits: list[str], opts: IngestSection, shape: tuple[int, int, int],
                 layout: str) -> tuple[int, int]:
    """(samples per shard, images per block). ingest.samples_per_shard, lowered so that a shard stays under
    ingest.shard_bytes: exactly for packed pixels, and for encoded images from the stored size of the first few
    (tar framing included). A layout whose blocks are sized by bytes gets ingest.block_size lowered to about its
    `block_bytes` of encoded images, to a divisor of ingest.samples_per_shard so that shards hold whole blocks."""
    kind = get_layout(layout)
    block = opts.block_size
    if kind.decodes:
        sizes = []
        for item in source.records(splits[0], 0, ESTIMATE_SAMPLES):
            if isinstance(item, Record):
                item = conform(item, shape, opts.size_rule, opts.channel_rule)
            if isinstance(item, Record):
                stored = item.encoded if item.encoded is not None else encode_image(item.image, opts.image_format,
                                                                                    opts.quality)
                sizes.append(len(stored) + TAR_FRAMING)
        per_sample = max(sizes) if sizes else int(np.prod(shape))
    else:
        per_sample = int(np.prod(shape))
    budget = opts.shard_bytes - 2 * TAR_RECORD  # a tar file ends with zero blocks, padded to a whole record
    if kind.block_bytes:
        block = max(1, min(block, kind.block_bytes // per_sample, budget // per_sample))
        while opts.samples_per_shard % block:
            block -= 1
    per_write = kind.per_write(block)
    if opts.samples_per_shard % per_write:  # packed: a shard holds whole blocks
        raise ValueError(
            f"ingest.samples_per_shard ({opts.samples_per_shard}) must be a multiple of ingest.block_size "
            f"({opts.block_size})"
        )
    fit = budget // per_sample // per_write * per_write
    return max(per_write, min(opts.samples_per_shard, fit)), block


def _target_shape(source, splits: list[str], opts: IngestSection) -> tuple[int, int, int]:
    """The dataset's (H, W, C): the configured size and channels, else the most common ones among the inputs.

    A source that can survey its files' headers (`Source.shapes`) gives the most common size and channel count;
    with the size rule 'reject', a survey where more than ingest.max_skip_fraction of the inputs are of other sizes
    is refused before anything is written, with the size histogram and the settings that fit them. A source that
    cannot survey gives its first image's shape (its inputs are usually of one shape; the skip threshold at the
    end still catches a collection that is not).
    """
    if opts.image_size is not None and opts.channels is not None:
        return (*opts.image_size, opts.channels)
    survey: Counter = Counter()
    for split in splits:
        survey.update(source.shapes(split) or {})
    if not survey:
        first = _first_image(source, splits).image.shape
        return (*(opts.image_size or first[:2]), opts.channels or first[2])
    sizes, channels = Counter(), Counter()
    for (h, w, c), n in survey.items():
        sizes[h, w] += n
        channels[c] += n
    size = opts.image_size or sizes.most_common(1)[0][0]
    total, off = sum(sizes.values()), sum(n for s, n in sizes.items() if s != tuple(size))
    if opts.size_rule == "reject" and off > opts.max_skip_fraction * total:
        histogram = ", ".join(f"{h}x{w}: {n}" for (h, w), n in sizes.most_common(8))
        more = f" and {len(sizes) - 8} more sizes" if len(sizes) > 8 else ""
        raise SourceError(
            f"{off} of {total} images are not {size[0]}x{size[1]} (H x W; sizes: {histogram}{more}), and "
            "ingest.size_rule 'reject' would skip them all. Pick a rule: ingest.size_rule crop (scale the shorter "
            "side, centre-crop) or resize (stretch), to the most common size or to ingest.image_size H,W; or raise "
            f"ingest.max_skip_fraction (now {opts.max_skip_fraction}) to skip them"
        )
    return (*size, opts.channels or channels.most_common(1)[0][0])
