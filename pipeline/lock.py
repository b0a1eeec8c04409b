"""One ingest at a time per shard directory: a lock object `.ingest/lock` created exclusively.

Two ingests into one directory would interleave their shards and both write an index that the other's
shards contradict. So an ingest holds `DirLock` from planning to `index.json`. The lock is a small JSON file
(host, pid, start time, a random token) created with `Location.create` (create-if-absent: O_EXCL-like on a
local disk, a conditional PUT on S3), so it works for local paths and fsspec URLs alike; no library offers
that across fsspec stores (filelock is local only, and its flock vanishes on NFS and object stores).

A second ingest refuses at once (it does not wait), naming the holder. A lock is stale when its holder is on
this host and its pid is gone (killed, crashed): it is taken over with a warning. A holder on another host
cannot be checked from here; the message says which file to delete once that process is known to be gone.

Taking over is itself guarded: the taker first creates `.ingest/lock.takeover-<token>` exclusively, so of
several processes that found the same dead holder exactly one removes its lock, and it removes the guard
only after its own lock exists (a late taker then reads the new holder and backs off).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import uuid
from datetime import UTC, datetime
from typing import Any

from pipeline.storage import Location

LOCK_NAME = ".ingest/lock"
logger = logging.getLogger(__name__)


class DirectoryLockedError(RuntimeError):
    """Another ingest holds the shard directory's lock."""


def _alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (a reused pid reads as alive: the safe side)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def describe(holder: dict[str, Any]) -> str:
    return (f"pid {holder.get('pid')} on host {holder.get('host')!r} since {holder.get('started')} "
            f"({holder.get('command') or 'unknown command'})")


def is_stale(holder: dict[str, Any]) -> bool:
    """True when the holder ran on this host and its process is gone."""
    return holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) and not _alive(
        holder["pid"])


class DirLock:
    """`with DirLock(location):` holds the directory's ingest lock for the block (see the module docstring)."""

    def __init__(self, location: Location) -> None:
        self.location = location
        self.record = {
            "host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.now(UTC).isoformat(timespec="seconds"), "token": uuid.uuid4().hex,
            "command": " ".join(sys.argv)[:200],
        }

    def holder(self) -> dict[str, Any] | None:
        """The current lock's record, or None when there is no lock."""
        try:
            text = self.location.read_text(LOCK_NAME)
        except FileNotFoundError:
            return None
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):  # not written by this module: never taken over
            return {"host": None, "pid": None, "started": None, "command": f"unreadable lock {text[:80]!r}"}
        return record

    def _locked(self, holder: dict[str, Any], why: str = "") -> DirectoryLockedError:
        path = self.location.display(LOCK_NAME)
        return DirectoryLockedError(
            f"{self.location} is being written by another ingest: {describe(holder)}{why}. Wait for it to finish, "
            f"or choose another ingest.shard_dir; if that process is gone, delete {path}"
        )

    def acquire(self) -> None:
        text = json.dumps(self.record)
        for _ in range(3):  # each turn either takes the lock or learns a newer holder
            if self.location.create(LOCK_NAME, text):
                return
            holder = self.holder()
            if holder is None:  # released between our create and our read
                continue
            if not is_stale(holder):
                raise self._locked(holder)
            guard = f"{LOCK_NAME}.takeover-{holder.get('token')}"
            if not self.location.create(guard, text):
                taking = f", and another process is taking its stale lock over ({self.location.display(guard)})"
                raise self._locked(holder, taking)
            try:
                if self.holder() != holder:  # someone took it over before our guard existed: read again
                    continue
                logger.warning("taking over the stale ingest lock of %s on %s: that process is gone",
                               describe(holder), self.location)
                self.location.remove(LOCK_NAME)
                if self.location.create(LOCK_NAME, text):
                    return
            finally:
                self.location.remove(guard)  # only now: our lock (or a newer holder's) already exists
        raise self._locked(self.holder() or {}, " (the lock changed hands while this ingest tried to take it)")

    def release(self) -> None:
        """Remove the lock if it is still ours (a holder on another host may have been forced out by hand)."""
        if (self.holder() or {}).get("token") == self.record["token"]:
            self.location.remove(LOCK_NAME)
        folder = os.path.dirname(self.location.path(LOCK_NAME))
        if self.location.local and os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)  # a refused ingest leaves a directory as it found it (object stores have no folders)

    def __enter__(self) -> DirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_unlocked(location: Location) -> None:
    """Raise DirectoryLockedError when a live ingest holds the directory (a quick look, for early errors)."""
    lock = DirLock(location)
    holder = lock.holder()
    if holder is not None and not is_stale(holder):
        raise lock._locked(holder)
