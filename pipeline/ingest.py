"""Ingestion: a source's records -> a complete shard directory, in parallel shard groups, resumable.

The steps are separate functions so that a Prefect flow can fan them out as tasks:

0. `prepare_dir` (once, under the directory's lock, `pipeline.lock`): reuse a complete directory, else refuse a
   directory that holds files this project did not write (`pipeline.ownership`) and note which shards are ours.
1. `plan_ingest` (once): the splits, the target image shape (config, or the first image's) and the layout,
   and per split the *shard groups*: record ranges of `shards_per_task * samples_per_shard` inputs each.
2. `write_group` (one task per group, on any worker): its records -> conformed images -> its shards, then a
   small marker `.ingest/{split}-{group}.json` listing them with their sha256. A re-run finds a group whose
   marker matches this plan and whose shards still match their checksums and keeps it; every other group is
   written again. So a killed ingest resumes where it stopped, and a corrupt shard costs only its group.
   Before writing, a group claims its shard numbers (`.ingest/{split}-{group}.claim`), so that the partial
   shards of an interrupted group are known to be ours.
3. `finalize_ingest` (once): merge the groups, write `skipped.jsonl` (every skipped input with its reason),
   remove the shards of an earlier run that the new index does not list (only ours: see `pipeline.ownership`),
   and write `index.json` last: only then does the directory read as complete.

`ingest` composes them in-process, holding the directory's lock throughout; the flow does the same.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
from pydantic import BaseModel, Field
from tqdm.auto import tqdm

from pipeline import ownership, shards
from pipeline.conform import conform, encode_image
from pipeline.errors import ShardFormatError, SourceError
from pipeline.layouts import get_layout
from pipeline.lock import DirLock
from pipeline.records import Record, Rejected
from pipeline.settings import SHARD_FIELDS, IngestSection
from pipeline.shards import INDEX_NAME, REPORT_NAME, ShardIndex, ShardInfo, ShardPlan, SplitInfo, read_index
from pipeline.sources import build_source, get_source_class, validate_options
from pipeline.storage import DestinationError, Location

MARKERS = ownership.MARKERS  # per-group completion markers, beside the shards
log = logging.getLogger(__name__)


class GroupTask(BaseModel, frozen=True):
    split: str
    group: int
    start: int
    stop: int | None  # None: to the end of the split (a source that cannot count its inputs)
    first_shard: int


class IngestPlan(BaseModel, frozen=True):
    source: dict[str, Any]  # {'name', 'config'} as index.json stores it
    out: str  # local path or fsspec URL
    options: IngestSection
    shard: ShardPlan
    splits: list[str]
    factor_names: list[str] | None
    groups: list[GroupTask]
    warnings: list[str] = Field(default_factory=list)  # for the person running the ingest: logged, not fatal

    def location(self) -> Location:
        return Location(self.out, self.options.storage_options)


class Skip(BaseModel):
    split: str
    key: str
    kind: str
    reason: str


class GroupResult(BaseModel):
    task: GroupTask
    fingerprint: str
    shards: list[ShardInfo]
    skipped: list[Skip]
    max_label: int
    has_labels: bool | None
    num_factors: int | None
    reused: bool = False


def source_record(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The source as `index.json` stores it: name and the validated, JSON-safe config."""
    return {"name": name, "config": validate_options(name, options).model_dump(mode="json")}


def _same_source(stored: dict[str, Any], name: str, options: dict[str, Any]) -> bool:
    """Whether a directory written from `stored` serves source `name` with `options`.

    Options missing a required field (a training config that names the source but not its root: it only reads
    the shards) match on the fields they give; complete options must match the stored config exactly.
    """
    if validate_options(name, options, complete=False) is not None:
        return stored == source_record(name, options)
    given = get_source_class(name).Config.model_construct(**options).model_dump(mode="json", include=set(options))
    return stored.get("name") == name and all(stored.get("config", {}).get(k) == v for k, v in given.items())


def is_complete(shard_dir: str | os.PathLike, storage_options: dict | None = None) -> bool:
    """True when the directory holds a readable `index.json` (the completion marker)."""
    try:
        read_index(shard_dir, storage_options)
    except ShardFormatError:
        return False
    return True


def prepare_dir(
    name: str, options: dict[str, Any], out_dir: str | os.PathLike, overwrite: bool,
    storage_options: dict | None = None,
) -> ShardIndex | None:
    """Return the existing index when `out_dir` is already complete for this source, else make it ready.

    Call it holding the directory's lock (`pipeline.lock.DirLock`). A complete directory written from a
    different source config is never silently reused or overwritten; overwrite=True forgets the finished groups
    too, so every shard is written again. A directory with files this project did not write is refused
    (`DestinationError`), and the shards that are ours are saved in `.ingest/owned` before the old index or
    markers go, so later steps know which files they may replace.
    """
    location = Location(out_dir, storage_options)
    ownership.check_ours(location)
    complete = location.exists() and location.isfile(INDEX_NAME)
    if complete and not overwrite:
        index = read_index(location)
        if not _same_source(index.source, name, options):
            raise ShardFormatError(
                f"{location} already holds shards of {index.source}, not of source {name!r} with {options}; "
                "choose another ingest.shard_dir or set ingest.overwrite=true"
            )
        return index
    ownership.snapshot(location)
    if complete:
        location.remove(INDEX_NAME)  # from here on the directory reads as incomplete until rewritten
    if overwrite:
        for marker in location.glob(f"{MARKERS}/*.json"):
            location.remove(marker)
    location.mkdir()
    return None


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
    source = build_source(name, options)
    splits = source.splits()
    if not splits:
        raise SourceError(f"source {name!r} has no splits; check its options")
    warnings = []
    if len(splits) == 1:
        warnings.append(
            f"source {name!r} gave only the split {splits[0]!r}: training needs a training and a validation split "
            "(data.train_split, data.val_split). Hold some out at ingest (an imagefolder without train/test folders: "
            "--source.options.test_fraction 0.1), or point both at this split when training"
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
        bounds = [(0, None)] if count is None else [(a, min(a + per_group, count)) for a in range(0, count, per_group)]
        for g, (start, stop) in enumerate(bounds):
            groups.append(GroupTask(split=split, group=g, start=start, stop=stop, first_shard=g * opts.shards_per_task))
    return IngestPlan(
        source=source_record(name, options),
        out=str(Location(out_dir, opts.storage_options)),
        options=opts,
        shard=ShardPlan(layout=layout, image_format=opts.image_format, quality=opts.quality,
                        samples_per_shard=per_shard,
                        block_size=block_size, image_shape=shape),
        splits=splits,
        factor_names=list(source.factor_names) or None,
        groups=groups,
        warnings=warnings,
    )


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


ESTIMATE_SAMPLES = 32  # encoded images whose size sets the samples per shard (the largest, so shards stay under)
TAR_FRAMING = 2048  # a sample's tar headers and padding: about 3 members of 512 + padding
TAR_RECORD = 10240  # tar's record: a file's size is a multiple of it


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


def _fingerprint(plan: IngestPlan, task: GroupTask) -> str:
    """What a group's shards depend on; a marker with another fingerprint is stale."""
    settings = plan.options.model_dump(mode="json", include=SHARD_FIELDS)
    data = {"source": plan.source, "options": settings, "shard": plan.shard.model_dump(mode="json"),
            "task": task.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _marker(task: GroupTask) -> str:
    return f"{MARKERS}/{task.split}-{task.group:06d}.json"


def _reusable(location: Location, task: GroupTask, fingerprint: str) -> GroupResult | None:
    """The stored result of a finished group, when it belongs to this plan and its shards are intact."""
    if not location.isfile(_marker(task)):
        return None
    try:
        result = GroupResult.model_validate_json(location.read_text(_marker(task)))
    except ValueError:
        return None
    if result.fingerprint != fingerprint or any(shards.check_shard(location, s) for s in result.shards):
        return None
    return result.model_copy(update={"reused": True})


def _conformed(
    items: Iterator[Record | Rejected], plan: IngestPlan, split: str, skipped: list[Skip]
) -> Iterator[Record]:
    """The records at the plan's shape; rejected inputs are listed in `skipped` or, under 'fail', stop the run."""
    opts = plan.options
    for item in items:
        if isinstance(item, Record):
            item = conform(item, plan.shard.image_shape, opts.size_rule, opts.channel_rule)
        if isinstance(item, Rejected):
            if opts.on_error == "fail":
                raise SourceError(
                    f"input {item.key!r} of split {split!r} was rejected ({item.kind}): {item.reason}. Fix or remove "
                    "it, or set ingest.on_error=skip to skip such inputs and list them in skipped.jsonl"
                )
            skipped.append(Skip(split=split, key=item.key, kind=item.kind, reason=item.reason))
            continue
        yield item


def write_group(plan: IngestPlan, task: GroupTask, progress: bool = False) -> GroupResult:
    """Write one shard group (or keep it, when a previous run finished it intact)."""
    location = plan.location()
    fingerprint = _fingerprint(plan, task)
    reused = _reusable(location, task, fingerprint)
    if reused is not None:
        return reused
    location.remove(_marker(task))
    _clear_range(location, task, plan.options.shards_per_task)
    source = build_source(plan.source["name"], plan.source["config"])
    items = source.records(task.split, task.start, task.stop)
    total = None if task.stop is None else task.stop - task.start
    items = tqdm(items, desc=f"ingest {task.split}/{task.group}", unit="img", total=total, disable=not progress)
    skipped: list[Skip] = []
    written = shards.write_shards(_conformed(items, plan, task.split, skipped), location, task.split,
                                  task.first_shard, plan.shard)
    result = GroupResult(task=task, fingerprint=fingerprint, shards=written.shards, skipped=skipped,
                         max_label=written.max_label, has_labels=written.has_labels, num_factors=written.num_factors)
    location.write_text(_marker(task), result.model_dump_json())
    location.remove(ownership.claim_name(task.split, task.group))  # the marker lists the shards from now on
    return result


def _shard_range(task: GroupTask, shards_per_task: int) -> tuple[int, int | None]:
    """The shard numbers a group may write: `shards_per_task` of them, or any from its first (an uncounted
    split's one group writes as many as its inputs fill)."""
    return task.first_shard, None if task.stop is None else task.first_shard + shards_per_task


def _clear_range(location: Location, task: GroupTask, shards_per_task: int) -> None:
    """Claim the group's shard numbers, and remove the shards there of an earlier or interrupted run (only ours)."""
    previous = ownership.read_claim(location, task.split, task.group)  # an interrupted attempt's range
    owned = ownership.read_owned(location)
    claim = ownership.write_claim(location, task.split, task.group, *_shard_range(task, shards_per_task))
    for name in location.glob(f"{task.split}-*.tar"):
        if not ownership.claimed(claim, name):
            continue
        if name not in owned and not ownership.claimed(previous, name):
            raise DestinationError(
                f"{location.display(name)} appeared after this ingest started and no vaepipe index or marker lists "
                "it; move it elsewhere and re-run the ingest"
            )
        location.remove(name)


def _merge_split(split: str, results: list[GroupResult], location: Location) -> SplitInfo:
    labelled = {r.has_labels for r in results if r.has_labels is not None}
    factors = {r.num_factors for r in results if r.has_labels is not None}
    if len(labelled) > 1 or len(factors) > 1:
        raise SourceError(f"split {split!r}: some records have labels or factors and others do not; fix the source")
    shard_list = [s for r in sorted(results, key=lambda r: r.task.group) for s in r.shards]
    skipped = Counter(s.kind for r in results for s in r.skipped)
    if not shard_list:
        report = location.display(REPORT_NAME)
        detail = f"all {sum(skipped.values())} inputs were skipped ({dict(skipped)}), each listed in {report}"
        raise SourceError(f"split {split!r} yielded no images: {detail if skipped else 'the source gave none'}")
    has_labels = labelled == {True}
    return SplitInfo(
        num_samples=sum(s.num_samples for s in shard_list),
        shards=shard_list,
        num_classes=max(r.max_label for r in results) + 1 if has_labels else None,
        num_factors=next(iter(factors), None),
        skipped=dict(skipped),
    )


def _check_skip_fraction(plan: IngestPlan, report: list[Skip], written: int, location: Location) -> None:
    """Refuse to complete a directory that left out more than ingest.max_skip_fraction of its inputs: an ingest
    that drops half a collection must not end with exit status 0 and a warning scrolled away."""
    total = written + len(report)
    if len(report) <= plan.options.max_skip_fraction * total:
        return
    kinds = dict(Counter(s.kind for s in report).most_common())
    raise SourceError(
        f"{len(report)} of {total} inputs ({len(report) / total:.1%}) were skipped ({kinds}), more than "
        f"ingest.max_skip_fraction ({plan.options.max_skip_fraction}); each is listed with its reason in "
        f"{location.display(REPORT_NAME)}. Fix the inputs or the rules that rejected them (ingest.size_rule, "
        "ingest.channel_rule, ingest.image_size), or raise ingest.max_skip_fraction to accept the loss; the "
        "shards written so far are kept for the re-run"
    )


def finalize_ingest(plan: IngestPlan, results: list[GroupResult]) -> ShardIndex:
    """Merge the groups, write the skip report, remove stray shards, and write `index.json` last."""
    location = plan.location()
    missing = {(t.split, t.group) for t in plan.groups} - {(r.task.split, r.task.group) for r in results}
    if missing:
        raise ShardFormatError(f"shard groups {sorted(missing)} were not written; re-run the ingest")
    report = [s for r in sorted(results, key=lambda r: (r.task.split, r.task.group)) for s in r.skipped]
    location.write_text(REPORT_NAME, "".join(s.model_dump_json() + "\n" for s in report))
    splits = {
        split: _merge_split(split, [r for r in results if r.task.split == split], location) for split in plan.splits
    }
    _check_skip_fraction(plan, report, sum(info.num_samples for info in splits.values()), location)
    owned = ownership.read_owned(location)
    claims = [ownership.claim(t.split, *_shard_range(t, plan.options.shards_per_task)) for t in plan.groups]
    for split, info in splits.items():  # shards of an earlier, differently planned run: never mixed in
        listed = {s.name for s in info.shards}
        for name in location.glob(f"{split}-*.tar"):
            if name in listed:
                continue
            if name in owned or any(ownership.claimed(c, name) for c in claims):
                location.remove(name)
            else:  # appeared during this ingest: not ours to delete, and the index does not list it
                log.warning("leaving %s in place: no index or marker of vaepipe lists it", location.display(name))
    index = ShardIndex(
        source=plan.source,
        layout=plan.shard.layout,
        image_format=plan.shard.image_format if get_layout(plan.shard.layout).decodes else None,
        block_size=plan.shard.block_size,
        image_shape=plan.shard.image_shape,
        splits=splits,
        factor_names=plan.factor_names,
        skipped=dict(Counter(s.kind for s in report)),
        skipped_report=REPORT_NAME,
    )
    shards.write_index(location, index)
    # the index now names every shard that is ours; markers of groups this plan no longer has list deleted shards
    planned = {_marker(t) for t in plan.groups}
    for name in [ownership.OWNED, *location.glob(f"{MARKERS}/*.claim"), *location.glob(f"{MARKERS}/*.json")]:
        if name not in planned:
            location.remove(name)
    return index


def ingest(
    name: str,
    options: dict[str, Any] | None,
    out_dir: str | os.PathLike,
    samples_per_shard: int = 8192,
    block_size: int = 1024,
    overwrite: bool = False,
    progress: bool = True,
    **settings: Any,
) -> ShardIndex:
    """Ingest every split of source `name` into `out_dir` in this process; reuse the directory when complete.

    `settings` are the other `IngestSection` fields that shape the shards (layout, on_error, size_rule,
    storage_options, ...); they are validated as a run config's are.
    """
    options = options or {}
    opts = IngestSection(samples_per_shard=samples_per_shard, block_size=block_size, overwrite=overwrite, **settings)
    with DirLock(Location(out_dir, opts.storage_options)):
        existing = prepare_dir(name, options, out_dir, opts.overwrite, opts.storage_options)
        if existing is not None:
            return existing
        plan = plan_ingest(name, options, out_dir, opts)
        for warning in plan.warnings:
            log.warning(warning)
        return finalize_ingest(plan, [write_group(plan, task, progress) for task in plan.groups])
