"""The supervisor that orchestrators signal, around `accelerate launch vae/train.py`.

    python -m vae.launch [accelerate launch options] vae/train.py --config PRESET [--section.field VALUE ...]

takes exactly the arguments of `accelerate launch`, runs it as a child, and exits 75 (`PREEMPTED_EXIT`) when
the run was preempted: every rank finished its step and the checkpoint to resume from is complete. This is
the process to signal (SIGTERM or SIGINT) and whose exit status to read. `accelerate launch` itself cannot be:
measured with accelerate 1.16 and torch 2.14, SIGTERM to its one-process launcher SIGTERMs the rank, SIGKILLs
it 5 s later whether or not its checkpoint is written, and exits 143; its multi-process launcher (torchrun's
elastic agent) waits 30 s before the SIGKILL and exits 143 too; a rank's own exit 75 comes out of either as 1.
So the supervisor
- forwards SIGTERM to the ranks (the launcher's children) and to nothing else: the launcher sees them exit in
  their own time, and the orchestrator's grace period is the only deadline;
- starts the launcher in its own process group, so a signal to the supervisor's group (Ctrl-C, a cancelled
  Prefect flow run, `kill -TERM -PGID`) reaches the supervisor alone; the launcher gets SIGTERM when the
  supervisor dies (even by SIGKILL), and ranks left by a launcher that died are stopped: nothing trains on;
- under Slurm, where every process of the step gets the signal, raises torchrun's SIGKILL deadline to
  `RANK_GRACE_S` (unless TORCH_ELASTIC_SHUTDOWN_TIMEOUT is set).

Facts measured here (DESIGN.md): `--cpu --num_processes 2` starts ONE process, and `--multi_gpu` on a CPU
host without ACCELERATE_USE_CPU=1 starts ranks that each believe they are alone. Two launches on the
default rendezvous port collide, so a free port is always chosen.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from vae.launch.command import output_dir_of
from vae.training import checkpoint
from vae.training.preemption import PREEMPTED_EXIT, Preemption

RANK_GRACE_S = 120  # a preempted step plus its checkpoint; the templates give the pods and jobs as long
POLL_S = 0.5  # the longest a signal waits before the supervisor passes it on
LOOK_EVERY_S = 5.0  # between looks for the launcher's children while no signal has come
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with(parent: int) -> None:
    """In the launcher between fork and exec: SIGTERM when the supervisor dies, even by SIGKILL (Linux only).

    No library exposes prctl; without it a killed supervisor would leave the launcher and ranks training.
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def preempted_since(output_dir: Path, before: Path | None) -> Path | None:
    """The checkpoint written on preemption after `before` (the newest when the launch began), else None.

    Saving is collective (every rank writes its state, rank 0 writes meta.json last), so a complete one means
    every rank got there: resuming from it loses nothing.
    """
    newest = checkpoint.latest(output_dir)
    if newest is None or newest == before:
        return None
    return newest if checkpoint.read_meta(newest).get("reason") == "preempted" else None


def running(process: psutil.Process) -> bool:
    """Whether a psutil.Process is still this process (not a reused pid) and not a zombie."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Ranks:
    """The launcher's children, remembered so that the signal reaches each once and none outlives the launch."""

    def __init__(self, launcher_pid: int) -> None:
        self.launcher = psutil.Process(launcher_pid)
        self.seen: dict[int, psutil.Process] = {}  # psutil checks identity (pid and start time) before it signals
        self.told: set[int] = set()

    def look(self) -> None:
        """Note new children; this reads all of /proc (~20 ms here), hence not on every poll."""
        try:
            for child in self.launcher.children():
                self.seen.setdefault(child.pid, child)
        except psutil.NoSuchProcess:  # the launcher is exiting
            pass

    def tell(self) -> None:
        """SIGTERM to each rank not told yet. While the launcher has none (it imports, or waits for a rendezvous),
        to the launcher itself: nothing has trained, so it may stop the way it does."""
        untold = [rank for pid, rank in self.seen.items() if pid not in self.told]
        for process in untold or ([] if self.told else [self.launcher]):
            self.told.add(process.pid)
            try:
                process.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass

    def stop_leftovers(self, code: int) -> None:
        """Ranks still running after the launcher exited (it was killed) would train on without it: stop them."""
        left = [rank for rank in self.seen.values() if running(rank)]
        if not left:
            return
        print(f"vae.launch: the launcher exited with {code} and left ranks {[r.pid for r in left]}; stopping them",
              file=sys.stderr, flush=True)
        for rank in left:
            rank.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(left, timeout=RANK_GRACE_S)
        for rank in alive:
            rank.kill()


def supervise(accelerate_args: list[str]) -> int:
    """Run `accelerate launch ACCELERATE_ARGS` and return this launch's exit status (see the module docstring)."""
    stop = Preemption()  # first: a signal while the launcher starts must not kill this process either
    output_dir = output_dir_of(accelerate_args)
    before = checkpoint.latest(output_dir)
    env = {**os.environ}
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(RANK_GRACE_S))
    me = os.getpid()
    launcher = subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", *accelerate_args], env=env,
                                process_group=0, preexec_fn=lambda: die_with(me))
    ranks = Ranks(launcher.pid)
    next_look = 0.0
    while True:
        try:
            code = launcher.wait(timeout=POLL_S)
            break
        except subprocess.TimeoutExpired:
            pass
        if stop.requested or time.monotonic() >= next_look:  # after a signal, every poll: new ranks get it too
            ranks.look()
            next_look = time.monotonic() + LOOK_EVERY_S
        if stop.requested:
            ranks.tell()
    ranks.stop_leftovers(code)
    preempted = preempted_since(output_dir, before)
    if preempted is not None:
        print(f"vae.launch: preempted; every rank checkpointed in {preempted}; exit {PREEMPTED_EXIT}: rerun with "
              "--train.resume true to continue from it", file=sys.stderr, flush=True)
        return PREEMPTED_EXIT
    if stop.requested and code != 0:
        print(f"vae.launch: stopped by signal {stop.signum} before a checkpoint was written (the launcher exited "
              f"with {code})", file=sys.stderr, flush=True)
        return 128 + stop.signum
    return code if code >= 0 else 128 - code
