"""Training runs in the test's own process, as `vae/train.py` runs without a launcher (Accelerate single-process).

A loaded 2-core machine spends most of a training subprocess's time importing torch and mlflow, so tests whose
subject is not the process boundary train here. The boundary itself (launchers, ranks, signals to processes) keeps
its real `accelerate launch` / `python -m vae.launch` runs in tests/test_train.py and tests/test_launch.py.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
PRESET = REPO / "infra/configs/digits.yaml"
# 1438 training images in batches of 256: 5 optimiser steps per epoch; the EMA kept, so checkpoints hold it
FAST = ["--train.batch_size", "256", "--train.ema_decay", "0.9", "--tracking.finalize", "false"]


@contextlib.contextmanager
def in_process(tracking_uri: str, sigterm_at: int | None = None) -> Iterator[pytest.MonkeyPatch]:
    """Train in this process: the trainer's SIGTERM/SIGINT handlers are captured instead of installed in pytest,
    runs are tracked at `tracking_uri`, and Accelerate's process-wide state starts fresh (a run's precision is fixed
    there once set). `sigterm_at`: SIGTERM reaches the trainer's own handler as optimiser step `sigterm_at` starts,
    once (as the signal would arrive from outside, at a known step). Yields the MonkeyPatch for further patches."""
    from accelerate.state import AcceleratorState

    from vae.training.trainer import Trainer

    handlers = {}
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(signal, "signal", lambda sig, handler: handlers.__setitem__(sig, handler))
            mp.setenv("MLFLOW_TRACKING_URI", tracking_uri)
            mp.delenv("MLFLOW_RUN_ID", raising=False)
            if sigterm_at is not None:
                step, sent = Trainer.step, []

                def interrupted(self, x):
                    if self.progress.global_step == sigterm_at and not sent:
                        sent.append(True)
                        handlers[signal.SIGTERM](signal.SIGTERM, None)
                    return step(self, x)

                mp.setattr(Trainer, "step", interrupted)
            yield mp
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def config(shard_dir: Path | str, out: Path, *overrides: str):
    """The digits preset on `shard_dir`, trained into `out`, with FAST and then `overrides` applied."""
    from vae.config import load_config

    return load_config(PRESET, ["--ingest.shard_dir", str(shard_dir), "--train.output_dir", str(out), *FAST,
                                *overrides])


def train(shard_dir: Path | str, out: Path, *overrides: str) -> None:
    """vae.training.trainer.train on `config(shard_dir, out, *overrides)`, publishing through the registry as
    vae/train.py does; call it inside `in_process`."""
    from vae.registry.publish import publish_run
    from vae.training.trainer import train as run

    run(config(shard_dir, out, *overrides), publisher=publish_run)


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint: weights, EMA weights and every optimiser's state, by file and key."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(f).items()})
    for f in sorted(path.glob("optimizer*.bin")):
        state = torch.load(f, map_location="cpu", weights_only=True)["state"]
        out.update({f"{f.name}:{i}:{k}": v for i, s in state.items() for k, v in s.items() if torch.is_tensor(v)})
    return out
