"""Which process a recorded pid is, so that a pid reused after a reboot or a crash is never signalled.

`vaepipe serve` records each process it starts with its command line and start time (psutil); `--stop` and
`vaepipe status` treat the pid as that process only while both still match.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import datetime

import psutil

# Linux derives start times from /proc/stat's boot time, which can read a second apart between two processes
START_TOLERANCE_S = 1.0
EXEC_WAIT_S = 5.0  # at most, for a process just started to show its command line


class NotOurs(Exception):
    """The pid is alive but is not (or cannot be shown to be) the process that was recorded."""


def identity(pid: int) -> dict:
    """{"cmdline", "create_time"} of the running process `pid`, to record beside its pid."""
    proc = psutil.Process(pid)
    # Popen returns when exec closes its error pipe, a moment before Linux sets the new command line: seen as an
    # empty one (measured: `vaepipe serve` recorded [] for its Prefect server)
    deadline = time.monotonic() + EXEC_WAIT_S
    while not (cmdline := proc.cmdline()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return {"cmdline": cmdline, "create_time": proc.create_time()}


def describe(cmdline: list[str], create_time: float) -> str:
    """`sleep 60, started 2026-12-06 01:40:13`: enough for a person to recognise a process."""
    command = " ".join(cmdline) or "(no command line)"
    started = datetime.fromtimestamp(create_time).strftime("%Y-%m-%d %H:%M:%S")
    return f"{command[:100]}{'...' if len(command) > 100 else ''}, started {started}"


def is_ours(pid: int, recorded: Mapping) -> bool:
    """True while `pid` runs the process `recorded` ({"cmdline", "create_time"}), False when it is gone.

    Raises NotOurs when another process holds the pid now, or when the record has no identity to compare
    (written by a vaepipe before identities were recorded).
    """
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:  # exited, not yet reaped by its parent
            return False
        with proc.oneshot():
            cmdline, create_time = proc.cmdline(), proc.create_time()
    except psutil.NoSuchProcess:  # ZombieProcess included
        return False
    except psutil.AccessDenied:  # another user's process: never one we started
        raise NotOurs(f"pid {pid} is now a process of another user") from None
    if recorded.get("cmdline") is None or recorded.get("create_time") is None:
        raise NotOurs(f"pid {pid} ({describe(cmdline, create_time)}) has no recorded identity (state written by an "
                      "older vaepipe), so it cannot be told from a process that reused the pid")
    if cmdline != list(recorded["cmdline"]) or abs(create_time - recorded["create_time"]) > START_TOLERANCE_S:
        raise NotOurs(f"pid {pid} is now another process ({describe(cmdline, create_time)})")
    return True
