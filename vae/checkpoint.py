"""Checkpoint layout: `<output_dir>/checkpoints/step-NNNNNNNNN/` from `accelerator.save_state` plus `meta.json`.

One is written at the end of every epoch and one when the run is preempted mid-epoch (SIGTERM/SIGINT). Each
holds everything needed to resume exactly: weights, optimiser, RNG states of every rank, the training
progress, the loader position, the EMA and the skipped-step counter. `meta.json` (epoch, step, resolved
config, MLflow run id, per-rank parameter checksums, why it was written) is written last and atomically, so a
checkpoint without it is incomplete and never resumed from. Directories are named by optimiser step, which
orders them whatever the epoch: Accelerate's automatic naming does not restore its counter on `load_state`,
and the next save collides.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

META = "meta.json"


class TrainProgress:
    """Where training stands; saved and restored with the rest of the state by Accelerate."""

    def __init__(self) -> None:
        self.epoch = 0  # the epoch in progress (equal to the completed epochs between epochs)
        self.global_step = 0  # optimiser steps taken, skipped ones included (the schedule follows the data)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "global_step": self.global_step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])


def checkpoint_root(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir(output_dir: Path, step: int) -> Path:
    return checkpoint_root(output_dir) / f"step-{step:09d}"


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    return sorted(p for p in root.glob("step-*") if (p / META).is_file()) if root.is_dir() else []


def latest(output_dir: Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def write_meta(path: Path, meta: dict[str, Any]) -> None:
    tmp = path / f".{META}.tmp"
    tmp.write_text(json.dumps(meta, indent=2, default=str))
    os.replace(tmp, path / META)


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((path / META).read_text())


def prune(output_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints, and any incomplete leftovers older than them."""
    complete = complete_checkpoints(output_dir)
    for old in complete[:-keep]:
        shutil.rmtree(old)
    newest = complete[-1] if complete else None
    for leftover in checkpoint_root(output_dir).glob("step-*"):
        if not (leftover / META).is_file() and newest is not None and leftover.name < newest.name:
            shutil.rmtree(leftover)
