"""Checkpoint layout: `<output_dir>/checkpoints/epoch-NNNN/` from `accelerator.save_state` plus `meta.json`.

`meta.json` (epoch, step, resolved config, MLflow run id, per-rank parameter checksums) is written last and
atomically, so a checkpoint without it is incomplete and never resumed from. Directories are named explicitly:
Accelerate's automatic naming does not restore its counter on `load_state`, and the next save collides.
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
        self.epoch = 0  # completed epochs
        self.global_step = 0  # optimiser steps taken

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "global_step": self.global_step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])


def checkpoint_root(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def epoch_dir(output_dir: Path, epoch: int) -> Path:
    return checkpoint_root(output_dir) / f"epoch-{epoch:04d}"


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    return sorted(p for p in root.glob("epoch-*") if (p / META).is_file()) if root.is_dir() else []


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
    for leftover in checkpoint_root(output_dir).glob("epoch-*"):
        if not (leftover / META).is_file() and newest is not None and leftover.name < newest.name:
            shutil.rmtree(leftover)
