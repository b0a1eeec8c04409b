"""Which files in a shard directory vaepipe wrote, so that an ingest never deletes or overwrites anything else.

A shard is ours when one of these names it:
- a previous `index.json` of ours (format `vaepipe-shards`): the shards of a finished ingest;
- a group marker `.ingest/{split}-{group}.json`: the shards of a finished group (of every split it wrote);
- a claim `.ingest/{split}-{group}.claim`, written before a group writes: the shard numbers it may write, so
  the partial shards of an interrupted group are ours too;
- `.ingest/owned`: the list this module saves when an ingest starts (`snapshot`), because the steps after it
  remove an old index or old markers before their shards are replaced or deleted.

A directory is ours when it is empty, or holds an index of ours or anything of ours in `.ingest/`. `snapshot`
refuses any other non-empty directory, and any `*-NNNNNN.tar` that nothing of ours names, before anything is
written: a shard name this ingest could overwrite or delete that some other program wrote.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pipeline.lock import LOCK_NAME
from pipeline.shards import FORMAT_NAME, INDEX_NAME
from pipeline.storage import DestinationError, Location

MARKERS = ".ingest"  # per-group completion markers and claims, the lock, the owned list
OWNED = f"{MARKERS}/owned"
SHARD_NAME = re.compile(r"(?P<split>[^/\\]+)-(?P<number>\d{6,})\.tar")  # what ShardWriter names; never a path
SHOWN = 5  # names listed in an error message


def _json(location: Location, name: str) -> Any:
    try:
        return json.loads(location.read_text(name))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _shard_names(entries: Any) -> set[str]:
    """`name` of each {name: ...} entry that is a plain shard file name."""
    if not isinstance(entries, list):
        return set()
    return {e["name"] for e in entries if isinstance(e, dict) and isinstance(e.get("name"), str)
            and SHARD_NAME.fullmatch(e["name"])}


def index_listing(location: Location) -> set[str] | None:
    """The shards an `index.json` of ours lists, or None when there is none (missing, foreign, unreadable)."""
    raw = _json(location, INDEX_NAME)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        return None
    splits = raw.get("splits")
    return set().union(*(_shard_names(s.get("shards")) for s in splits.values() if isinstance(s, dict))) if (
        isinstance(splits, dict)) else set()


def claim_name(split: str, group: int) -> str:
    return f"{MARKERS}/{split}-{group:06d}.claim"


def claim(split: str, first: int, stop: int | None) -> dict[str, Any]:
    """The claim record of shards `first` .. `stop - 1` of `split` (stop None: any from `first`)."""
    return {"split": split, "first": first, "stop": stop}


def write_claim(location: Location, split: str, group: int, first: int, stop: int | None) -> dict[str, Any]:
    """Record that this group is about to write shards `first` .. `stop - 1`, before it writes any."""
    record = claim(split, first, stop)
    location.write_text(claim_name(split, group), json.dumps(record))
    return record


def claimed(claim: Any, name: str) -> bool:
    """Whether shard file `name` is in the range a claim record names."""
    match = SHARD_NAME.fullmatch(name)
    if not isinstance(claim, dict) or match is None or match["split"] != claim.get("split"):
        return False
    number, first, stop = int(match["number"]), claim.get("first"), claim.get("stop")
    return isinstance(first, int) and number >= first and (stop is None or (isinstance(stop, int) and number < stop))


def read_claim(location: Location, split: str, group: int) -> Any:
    return _json(location, claim_name(split, group))


def _ours_in_markers(location: Location, present: list[str]) -> set[str]:
    """Shards named by group markers, claims and the saved owned list."""
    names = set(_json(location, OWNED) or [])
    for marker in location.glob(f"{MARKERS}/*.json"):
        record = _json(location, marker)
        if not isinstance(record, dict):
            continue
        names |= _shard_names(record.get("shards"))  # a marker written before groups wrote held-out splits
        parts = record.get("parts")
        for part in parts if isinstance(parts, list) else []:
            names |= _shard_names(part.get("shards")) if isinstance(part, dict) else set()
    for claim in location.glob(f"{MARKERS}/*.claim"):
        record = _json(location, claim)
        names |= {name for name in present if claimed(record, name)}
    return names


def read_owned(location: Location) -> set[str]:
    """The list `snapshot` saved (empty when there is none)."""
    return set(_json(location, OWNED) or [])


def _has_markers(location: Location) -> bool:
    return any(not name.startswith(LOCK_NAME) for name in location.glob(f"{MARKERS}/*"))


def _listed(names: list[str]) -> str:
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def check_ours(location: Location) -> set[str] | None:
    """Refuse a directory that is not ours (see the module docstring); return the index's shards, if any."""
    entries = [name for name in location.listdir() if name != MARKERS]
    listing = index_listing(location)
    if entries and listing is None and not _has_markers(location):
        raise DestinationError(
            f"{location} is not empty and holds no shards of vaepipe (no index.json of ours, no {MARKERS}/ group "
            f"markers): {_listed(entries)}. An ingest never writes into or deletes files it did not write: choose "
            "another ingest.shard_dir, or empty this one"
        )
    return listing


def snapshot(location: Location) -> set[str]:
    """Refuse a foreign directory or foreign shards in ours; save and return the shards that are ours."""
    listing = check_ours(location) or set()
    present = [name for name in location.listdir() if SHARD_NAME.fullmatch(name)]
    ours = (listing | _ours_in_markers(location, present)) & set(present)
    foreign = sorted(set(present) - ours)
    if foreign:
        raise DestinationError(
            f"{location} holds shard files that no index.json or {MARKERS}/ marker of vaepipe lists: "
            f"{_listed(foreign)}. An ingest would overwrite or delete them: move them elsewhere, or choose another "
            "ingest.shard_dir"
        )
    location.write_text(OWNED, json.dumps(sorted(ours)))
    return ours
