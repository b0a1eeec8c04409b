"""A training run in one process and its metric journal (vae/tracking/journal.py), as the tests of a tracking server
that
goes away drive and read them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from support.training import PRESET, REPO
from vae.tracking.journal import JOURNAL_DIR


def train_argv(tmp_path: Path, shard_dir: Path, *overrides: str) -> list[str]:
    """vae/train.py in one process (Accelerate then runs single-process), so a test can pause it as a whole; its
    output in tmp_path/run."""
    return [sys.executable, str(REPO / "vae/train.py"), "--config", str(PRESET), "--ingest.shard_dir",
            str(shard_dir), "--train.output_dir", str(tmp_path / "run"), "--tracking.finalize", "false", *overrides]


def journal_of(tmp_path: Path) -> Path:
    """The one journal of the run train_argv(tmp_path, ...) started."""
    [path] = (tmp_path / "run" / JOURNAL_DIR).glob("*.jsonl")
    return path


def entries(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def sent(path: Path) -> int:
    """How many of the journal's entries the server acknowledged."""
    counter = path.with_suffix(".sent")
    return int(counter.read_text()) if counter.exists() else 0


def logged_image_steps(client, run_id: str, key: str) -> list[int]:
    """The steps at which run `run_id` holds an image `key`, one per complete upload (MLflow 3's log_image writes
    images/<key, '/' as '~'>+step+<step>+timestamp+<ms>+<uuid>.png and then the same name +compressed.webp)."""
    prefix = f"images/{key.replace('/', '~')}+step+"
    return sorted(int(f.path.removeprefix(prefix).split("+")[0]) for f in client.list_artifacts(run_id, "images")
                  if f.path.startswith(prefix) and f.path.endswith("+compressed.webp"))
