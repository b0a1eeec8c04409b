"""Ingestion: a source's records -> a complete shard directory, in parallel shard groups, resumable.

The steps are separate functions, one module each, so that a Prefect flow can fan them out as tasks:

0. `prepare_dir` (`prepare.py`, once, under the directory's lock): reuse a complete directory of this source, else
   make it ready, refusing one that holds files this project did not write.
1. `plan_ingest` (`plan.py`, once): the splits, the target image shape and the layout, and per split the *shard
   groups*: record ranges of `shards_per_task * samples_per_shard` inputs each, or, for a split the source cannot
   count, one group per part it names (`Source.parts`: its input files).
2. `write_group` (`group.py`, one task per group, on any worker): its records -> conformed images -> its shards
   and a marker listing them; a re-run keeps the groups a previous run finished intact.
3. `finalize_ingest` (`finalize.py`, once): merge the groups, write the skip report, remove stray shards of ours,
   and write `index.json` last: only then does the directory read as complete.

`ingest` composes them in-process, holding the directory's lock throughout; the flow does the same.

This package owns writing shard directories. Its settings are `pipeline.settings.IngestSection`; it imports the
sources, the shard format (`pipeline.shards`, `pipeline.layouts`, `pipeline.conform`), storage, ownership and the
lock, never the loader (`pipeline.loader`), `vae` or `flows`. Inside it, imports point one way: `prepare` and
`group` import `plan`, `finalize` imports `plan` and `group`, and this face imports them all.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from pipeline.ingestion.finalize import finalize_ingest
from pipeline.ingestion.group import GroupResult, Skip, write_group
from pipeline.ingestion.plan import GroupTask, IngestPlan, plan_ingest
from pipeline.ingestion.prepare import is_complete, prepare_dir
from pipeline.lock import DirLock
from pipeline.ownership import MARKERS
from pipeline.settings import IngestSection
from pipeline.shards import ShardIndex
from pipeline.storage import Location

__all__ = ["MARKERS", "GroupResult", "GroupTask", "IngestPlan", "Skip", "finalize_ingest", "ingest", "is_complete",
           "plan_ingest", "prepare_dir", "write_group"]
log = logging.getLogger(__name__)


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
