"""Checks an ingest can pass before any work starts, so a wrong root or an unusable destination is one line.

`vaepipe ingest` runs `check_ingest` before Prefect starts (a temporary Prefect server alone takes 15-30 s
here, and a failure inside the flow is logged with tracebacks and retried). The checks are cheap: the source's
options and its list of splits (no image is read), and the destination: not a file, writable (one small
probe file, removed), not a directory of someone else's files, not locked by a running ingest.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from pipeline import ownership
from pipeline.errors import SourceError
from pipeline.lock import check_unlocked
from pipeline.sources import build_source
from pipeline.storage import DestinationError, Location


def check_source(name: str, options: dict[str, Any]) -> list[str]:
    """Build the source and list its splits; SourceError (one line, naming the option) when it cannot."""
    try:
        splits = build_source(name, options).splits()
    except OSError as err:  # a source that did not turn its own file error into a SourceError
        raise SourceError(f"source {name!r} cannot read its input: {err}; check source.options") from None
    if not splits:
        raise SourceError(f"source {name!r} has no splits; check source.options")
    return splits


def _check_local(root: Path) -> None:
    existing = next(p for p in (root, *root.parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == root else f"cannot be created: {existing} is a file"
        raise DestinationError(f"shard directory {root} {where}; set ingest.shard_dir to a directory")
    try:  # probe where the ingest will first write: the directory, or the ancestor it will be created in; a
        # check that is refused, or followed by a refusal, leaves no directory behind
        probe = existing / f".vaepipe-write-probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise DestinationError(
            f"shard directory {root} is not writable ({err.strerror}); set ingest.shard_dir to a directory this user "
            "can write, or fix its permissions"
        ) from None


def _check_remote(location: Location) -> None:
    if location.fs.isfile(location.root):
        raise DestinationError(f"shard directory {location} is a file (object); set ingest.shard_dir to a prefix")
    probe = f".vaepipe-write-probe-{uuid.uuid4().hex}"
    try:
        location.fs.pipe_file(location.path(probe), b"")
        location.remove(probe)
    except OSError as err:  # fsspec maps a store's permission and auth failures to OSError subclasses
        raise DestinationError(
            f"shard directory {location} is not writable ({err}); check ingest.storage_options (credentials, "
            "endpoint) or choose another ingest.shard_dir"
        ) from None


def check_destination(out_dir: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> None:
    """DestinationError when `out_dir` is a file, not writable or someone else's; DirectoryLockedError when busy."""
    location = Location(out_dir, storage_options)
    if location.local:
        _check_local(Path(location.root))
    else:
        _check_remote(location)
    ownership.check_ours(location)
    check_unlocked(location)


def check_ingest(
    name: str, options: dict[str, Any], out_dir: str | os.PathLike, storage_options: dict[str, Any] | None = None
) -> None:
    """Every check above; raises SourceError, DestinationError or DirectoryLockedError with one line."""
    check_source(name, options)
    check_destination(out_dir, storage_options)
