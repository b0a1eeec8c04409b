"""Preemption: SIGTERM and SIGINT only raise a flag, which the trainer and the launch supervisor act on.

The trainer finishes its step, writes a checkpoint and exits with `PREEMPTED_EXIT`; the supervisor
(vae.launch) passes the signal on to the ranks and exits with it once their checkpoint is complete. Kept apart
from the trainer so that the supervisor and the flows read it without importing torch.
"""

from __future__ import annotations

import signal

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "try again"; the checkpoint to resume from has been written


class Preemption:
    """Installs itself for SIGTERM and SIGINT; `requested` and `signum` (the last one) say whether one came."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._request)

    def _request(self, signum: int, frame: object) -> None:
        self.requested, self.signum = True, signum
