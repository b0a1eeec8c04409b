"""Step 0 of an ingest, once, under the directory's lock (`pipeline.lock`): `prepare_dir` reuses a complete
directory of the same source, else refuses a directory that holds files this project did not write
(`pipeline.ownership`) and notes which shards are ours before anything is removed."""

from __future__ import annotations

import os
from typing import Any

from pipeline import ownership
from pipeline.errors import ShardFormatError
from pipeline.ingestion.plan import source_record
from pipeline.ownership import MARKERS
from pipeline.shards import INDEX_NAME, ShardIndex, read_index
from pipeline.sources import get_source_class, validate_options
from pipeline.storage import Location


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
