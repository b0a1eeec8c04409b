"""Step 3 of an ingest, once: `finalize_ingest` merges the groups' results, writes `skipped.jsonl` (every skipped
input with its reason), refuses a run that skipped more than ingest.max_skip_fraction, removes the shards of an
earlier run that the new index does not list (only ours: see `pipeline.ownership`), and writes `index.json`
last: only then does the directory read as complete."""

from __future__ import annotations

import logging
from collections import Counter

from pipeline import ownership, shards
from pipeline.errors import ShardFormatError, SourceError
from pipeline.ingestion.group import GroupResult, Skip, marker_name, shard_range
from pipeline.ingestion.plan import IngestPlan
from pipeline.layouts import get_layout
from pipeline.ownership import MARKERS
from pipeline.shards import REPORT_NAME, ShardIndex, SplitInfo
from pipeline.storage import Location

log = logging.getLogger(__name__)


def _merge_split(split: str, results: list[GroupResult], plan: IngestPlan, location: Location) -> SplitInfo:
    """The split's entry in index.json, from the parts the groups wrote into it (in group order)."""
    ordered = sorted(results, key=lambda r: (plan.splits.index(r.task.split), r.task.group))
    parts = [p for r in ordered for p in r.parts if p.split == split]
    labelled = {p.has_labels for p in parts if p.has_labels is not None}
    factors = {p.num_factors for p in parts if p.has_labels is not None}
    if len(labelled) > 1 or len(factors) > 1:
        raise SourceError(f"split {split!r}: some records have labels or factors and others do not; fix the source")
    captions = {p.captions for p in parts if p.has_labels is not None}
    if len(captions) > 1:
        raise SourceError(shards.captions_mixed(f"split {split!r}"))
    shard_list = [s for p in parts for s in p.shards]
    skipped = Counter(s.kind for r in results for s in r.skipped if s.split == split)
    if not shard_list:
        raise SourceError(f"split {split!r} yielded no images: {_why_empty(split, skipped, plan, location)}")
    has_labels = labelled == {True}
    return SplitInfo(
        num_samples=sum(s.num_samples for s in shard_list),
        shards=shard_list,
        num_classes=max(p.max_label for p in parts) + 1 if has_labels else None,
        num_factors=next(iter(factors), None),
        captions=captions == {True},
        skipped=dict(skipped),
    )


def _why_empty(split: str, skipped: Counter, plan: IngestPlan, location: Location) -> str:
    held = plan.held_out
    if skipped:
        report = location.display(REPORT_NAME)
        return f"all {sum(skipped.values())} inputs were skipped ({dict(skipped)}), each listed in {report}"
    if held is not None and split in (held.split, held.source_split):
        return (f"ingest.test_fraction {held.fraction} sent {'none' if split == held.split else 'every one'} of the "
                f"inputs of {held.source_split!r} to {held.split!r} (by a hash of each key: a small collection can get "
                "none or all); change ingest.test_fraction or ingest.test_seed")
    return "the source gave none"


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
    splits = {split: _merge_split(split, results, plan, location) for split in plan.splits}
    _check_skip_fraction(plan, report, sum(info.num_samples for info in splits.values()), location)
    owned = ownership.read_owned(location)
    claims = [ownership.claim(split, *shard_range(t, plan.options.shards_per_task))
              for t in plan.groups for split in plan.outputs(t.split)]
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
        held_out=plan.held_out,
        skipped=dict(Counter(s.kind for s in report)),
        skipped_report=REPORT_NAME,
    )
    shards.write_index(location, index)
    # the index now names every shard that is ours; markers of groups this plan no longer has list deleted shards
    planned = {marker_name(t) for t in plan.groups}
    for name in [ownership.OWNED, *location.glob(f"{MARKERS}/*.claim"), *location.glob(f"{MARKERS}/*.json")]:
        if name not in planned:
            location.remove(name)
    return index
