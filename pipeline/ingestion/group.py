"""Step 2 of an ingest, one task per shard group, on any worker: `write_group` turns its records into conformed
images and its shards, then writes a small marker `.ingest/{split}-{group}.json` listing them with their sha256.
A group of the split that ingest.test_fraction holds 'test' out of writes the shards of both, from one read.

A re-run keeps a group whose marker matches this plan (the same source and `SHARD_FIELDS`) and whose shards still
match their checksums; every other group is written again. So a killed ingest resumes where it stopped, and a
corrupt shard costs only its group. Before writing, a group claims its shard numbers
(`.ingest/{split}-{group}.claim`), so that the partial shards of an interrupted group are known to be ours.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack

from pydantic import BaseModel
from tqdm.auto import tqdm

from pipeline import ownership, shards
from pipeline.conform import conform
from pipeline.errors import SourceError
from pipeline.ingestion.plan import PART_SHARDS, GroupTask, IngestPlan
from pipeline.ownership import MARKERS
from pipeline.records import Record, Rejected
from pipeline.settings import SHARD_FIELDS
from pipeline.shards import ShardInfo
from pipeline.sources import build_source
from pipeline.storage import DestinationError, Location


class Skip(BaseModel):
    """An input left out, and why: a line of skipped.jsonl."""

    split: str
    key: str
    kind: str
    reason: str


class Part(BaseModel):
    """What a group wrote into one split."""

    split: str
    shards: list[ShardInfo]
    max_label: int
    has_labels: bool | None  # None: no records
    num_factors: int | None
    captions: bool | None


class GroupResult(BaseModel):
    """What a group wrote, or kept from a previous run: stored as its marker, merged by `finalize_ingest`."""

    task: GroupTask
    fingerprint: str
    parts: list[Part]  # one per split the group writes (`IngestPlan.outputs`)
    skipped: list[Skip]  # each with the split its input went to
    reused: bool = False

    @property
    def shards(self) -> list[ShardInfo]:
        return [s for part in self.parts for s in part.shards]


def _fingerprint(plan: IngestPlan, task: GroupTask) -> str:
    """What a group's shards depend on; a marker with another fingerprint is stale."""
    settings = plan.options.model_dump(mode="json", include=SHARD_FIELDS)
    # exclude_defaults: a task without a part hashes as it did before GroupTask had one, so markers stay valid
    data = {"source": plan.source, "options": settings, "shard": plan.shard.model_dump(mode="json"),
            "task": task.model_dump(mode="json", exclude_defaults=True)}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def marker_name(task: GroupTask) -> str:
    """Where the group's completion marker lives."""
    return f"{MARKERS}/{task.split}-{task.group:06d}.json"


def _reusable(location: Location, task: GroupTask, fingerprint: str) -> GroupResult | None:
    """The stored result of a finished group, when it belongs to this plan and its shards are intact."""
    if not location.isfile(marker_name(task)):
        return None
    try:
        result = GroupResult.model_validate_json(location.read_text(marker_name(task)))
    except ValueError:
        return None
    if result.fingerprint != fingerprint or any(shards.check_shard(location, s) for s in result.shards):
        return None
    return result.model_copy(update={"reused": True})


def _conformed(
    items: Iterator[Record | Rejected], plan: IngestPlan, split: str, skipped: list[Skip]
) -> Iterator[Record]:
    """The records at the plan's shape; rejected inputs are listed in `skipped` (under the split they would have
    gone to) or, under 'fail', stop the run."""
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
            skipped.append(Skip(split=plan.split_of(split, item.key), key=item.key, kind=item.kind,
                                reason=item.reason))
            continue
        yield item


def write_group(plan: IngestPlan, task: GroupTask, progress: bool = False) -> GroupResult:
    """Write one shard group (or keep it, when a previous run finished it intact)."""
    location = plan.location()
    fingerprint = _fingerprint(plan, task)
    reused = _reusable(location, task, fingerprint)
    if reused is not None:
        return reused
    location.remove(marker_name(task))
    outputs = plan.outputs(task.split)
    for split in outputs:
        _clear_range(location, split, task, plan.options.shards_per_task)
    source = build_source(plan.source["name"], plan.source["config"], plan.options.max_pixels)
    if task.part is None:
        items = source.records(task.split, task.start, task.stop)
    else:
        items = source.part_records(task.split, task.part)
    total = None if task.stop is None else task.stop - task.start
    items = tqdm(items, desc=f"ingest {task.split}/{task.group}", unit="img", total=total, disable=not progress)
    skipped: list[Skip] = []
    first, stop = shard_range(task, plan.options.shards_per_task)
    room = None if stop is None else (stop - first) * plan.shard.samples_per_shard  # images per split
    written = Counter()
    with ExitStack() as stack:
        sinks = {split: stack.enter_context(shards.SplitWriter(location, split, task.first_shard, plan.shard))
                 for split in outputs}
        for record in _conformed(items, plan, task.split, skipped):
            split = plan.split_of(task.split, record.key)
            written[split] += 1
            if room is not None and written[split] > room:
                raise _overflow(task, split, stop - first, plan.shard.samples_per_shard)
            sinks[split].add(record)
    parts = [Part(split=split, **vars(sink.written)) for split, sink in sinks.items()]
    result = GroupResult(task=task, fingerprint=fingerprint, parts=parts, skipped=skipped)
    location.write_text(marker_name(task), result.model_dump_json())
    for split in outputs:  # the marker lists the shards from now on
        location.remove(ownership.claim_name(split, task.group))
    return result


def shard_range(task: GroupTask, shards_per_task: int) -> tuple[int, int | None]:
    """The shard numbers a group may write, in each split it writes: `shards_per_task` of them, `PART_SHARDS` for
    a part of an uncounted split, or any from its first (an uncounted split's one group writes as many as its
    inputs fill)."""
    if task.part is not None:
        return task.first_shard, task.first_shard + PART_SHARDS
    return task.first_shard, None if task.stop is None else task.first_shard + shards_per_task


def _overflow(task: GroupTask, split: str, room: int, per_shard: int) -> SourceError:
    """A group that would write past its shard numbers, into the next group's."""
    return SourceError(
        f"part {task.part} of split {task.split!r} holds more images than its {room} shards of {per_shard} in "
        f"split {split!r}: raise ingest.samples_per_shard, or split the input file"
    )


def _clear_range(location: Location, split: str, task: GroupTask, shards_per_task: int) -> None:
    """Claim the group's shard numbers in `split`, and remove the shards there of an earlier or interrupted run
    (only ours)."""
    previous = ownership.read_claim(location, split, task.group)  # an interrupted attempt's range
    owned = ownership.read_owned(location)
    claim = ownership.write_claim(location, split, task.group, *shard_range(task, shards_per_task))
    for name in location.glob(f"{split}-*.tar"):
        if not ownership.claimed(claim, name):
            continue
        if name not in owned and not ownership.claimed(previous, name):
            raise DestinationError(
                f"{location.display(name)} appeared after this ingest started and no vaepipe index or marker lists "
                "it; move it elsewhere and re-run the ingest"
            )
        location.remove(name)
