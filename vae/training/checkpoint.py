"""Checkpoint layout: `<output_dir>/checkpoints/step-NNNNNNNNN/`, and what may be loaded from one.

One is written at the end of every epoch and one when the run is preempted mid-epoch (SIGTERM/SIGINT). Each
holds everything needed to resume exactly, and nothing that runs code when loaded:

| file | written by | holds | loaded with |
| --- | --- | --- | --- |
| `model.safetensors` | `save_state`, rank 0 | weights | safetensors |
| `optimizer.bin` (`scaler.pt`: fp16) | `save_state`, rank 0 | optimiser (scaler) state | torch, weights_only=True |
| `ema.safetensors` | rank 0 | EMA weights, when kept | safetensors |
| `model_1.safetensors`, `optimizer_1.bin`, `ema_<name>.safetensors` | as above | a discriminator's state | as above |
| `train_state.json` | rank 0 | progress, loader position, step guard, EMA count | json |
| `rng-<rank>.json` | every rank | python, numpy, torch CPU and device RNG states | json |
| `meta.json` | rank 0, last | epoch, step, model spec, resolved config, MLflow run id, checksums, file sizes | json |

Accelerate would keep the registered objects and the RNG in pickles (`custom_checkpoint_N.pkl` loaded with
`weights_only=False`, `random_states_N.pkl`): a file planted by anyone who can write the volume then runs code
on resume. So nothing is registered with it, its RNG pickle is removed right after `save_state` writes it, and
a checkpoint holding any file not in the table is refused before anything in it is read.

Every file and the directory are fsynced before `meta.json` is written (temporary name, fsync, rename): its
presence means the checkpoint is complete, and it records each file's size, so a truncated file is found before
it is loaded. Directories are named by optimiser step, which orders them whatever the epoch: Accelerate's
automatic naming does not restore its counter on `load_state`, and the next save collides.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from vae.training.errors import TrainingError

META = "meta.json"
TRAIN_STATE = "train_state.json"
EMA_WEIGHTS = "ema.safetensors"
FORMAT = 2  # 1: Accelerate's pickled registered objects and RNG states (refused: loading them can run code)
# Every file a checkpoint may hold; anything else (a planted custom_checkpoint_0.pkl) makes it unloadable.
ALLOWED = re.compile(r"(model(_\d+)?\.safetensors|optimizer(_\d+)?\.bin|scaler\.pt|ema(_[a-z]+)?\.safetensors|"
                     r"train_state\.json|rng-\d+\.json|meta\.json)")
UNLOADABLE_PREFIX = "unloadable-"  # a checkpoint skipped on resume is moved aside under this name, never deleted

# Fields that may differ between a checkpoint's config and the run that resumes it: they change neither the data
# order, the model, the optimiser nor the schedule of the steps already taken. A name ending in "." is a prefix.
RESUMABLE_CHANGES = (
    "train.epochs", "train.log_every", "train.resume", "train.retries", "train.keep_checkpoints",
    "train.output_dir", "train.expected_world_size", "train.cuda_graphs", "train.deferred_step_check", "tracking.",
)


class CheckpointError(TrainingError):
    """A checkpoint cannot be loaded; the message names the file and why."""


class TrainProgress:
    """Where training stands; saved in train_state.json."""

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


def size(path: Path) -> int:
    """Bytes of the files in a checkpoint directory."""
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


# ---- writing: every file durable before the completion marker


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make the directory's entries (new names, renames) durable; files need their own fsync."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, data: Any) -> None:
    """Write, fsync, then rename into place: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=2, default=str))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_meta(path: Path, meta: dict[str, Any]) -> None:
    """Fsync every file and the directory, record their sizes, then write meta.json (the completion marker)."""
    files = sorted(f for f in path.iterdir() if f.is_file() and f.name != META)
    for f in files:
        fsync_file(f)
    fsync_dir(path)
    write_json(path / META, {"format": FORMAT, **meta, "files": {f.name: f.stat().st_size for f in files}})
    fsync_dir(path)


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


def set_aside(path: Path) -> Path:
    """Move an unloadable checkpoint out of the resume order, keeping its files for inspection."""
    target = path.with_name(UNLOADABLE_PREFIX + path.name)
    n = 1
    while target.exists():
        target, n = path.with_name(f"{UNLOADABLE_PREFIX}{path.name}.{n}"), n + 1
    path.rename(target)
    return target


# ---- reading: refuse before loading anything that is not what we wrote


def verify(path: Path, meta: dict[str, Any], rank: int) -> None:
    """Raise CheckpointError unless the directory holds only our files, each of the size meta.json recorded."""
    if meta.get("format", 1) != FORMAT:
        raise CheckpointError(
            f"format {meta.get('format', 1)}, written by an earlier vaepipe that kept its state in pickles "
            "(custom_checkpoint_*.pkl, random_states_*.pkl), which resume no longer loads because loading a pickle "
            "can run code; start a new --train.output_dir"
        )
    for f in sorted(path.iterdir()):
        if not ALLOWED.fullmatch(f.name):
            raise CheckpointError(f"{f.name} is not a file vaepipe writes (a checkpoint holds no pickles); "
                                  "it was not loaded")
    recorded = meta.get("files", {})
    for name in (TRAIN_STATE, f"rng-{rank}.json", "model.safetensors"):
        if name not in recorded:
            raise CheckpointError(f"meta.json lists no {name}")
    for name, expected in recorded.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{name} is missing")
        if f.stat().st_size != expected:
            raise CheckpointError(f"{name} has {f.stat().st_size} bytes, meta.json recorded {expected} (truncated "
                                  "or overwritten)")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path.name} cannot be read: {err}") from err


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path.name} cannot be read: {type(err).__name__}: {err}") from err


def blame(path: Path, err: BaseException) -> str:
    """Which of the files `accelerator.load_state` reads made it fail (it does not say): each is loaded alone,
    with the same safe loaders, only on this failure path."""
    for f in sorted(path.glob("model*.safetensors")) + sorted(path.glob("optimizer*.bin")) + [path / "scaler.pt"]:
        name = f.name
        if not f.is_file():
            continue
        try:
            load_file(f) if name.endswith(".safetensors") else torch.load(f, map_location="cpu", weights_only=True)
        except Exception as probe:  # noqa: BLE001 - any failure of this file alone is the answer; none is swallowed
            return f"{name} cannot be loaded: {type(probe).__name__}: {probe}"
    return f"{type(err).__name__}: {err}"


# ---- RNG states as JSON (Accelerate keeps them in a pickle)


def _device_rng_module():
    """torch's module for the current accelerator (torch.cuda, torch.xpu, ...), or None on a CPU-only host."""
    if not torch.accelerator.is_available():
        return None
    return torch.get_device_module(torch.accelerator.current_accelerator().type)


def rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch CPU and device RNG states, as JSON-ready lists of ints."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss_next],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    device = _device_rng_module()
    if device is not None:
        states = device.get_rng_state_all() if hasattr(device, "get_rng_state_all") else [device.get_rng_state()]
        state["device"] = [s.tolist() for s in states]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned; raises CheckpointError on a state of the wrong shape."""
    try:
        version, internal, gauss_next = state["python"]
        random.setstate((version, tuple(internal), gauss_next))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
        device = _device_rng_module()
        if device is not None and "device" in state:
            states = [torch.tensor(s, dtype=torch.uint8) for s in state["device"]]
            if hasattr(device, "set_rng_state_all"):
                device.set_rng_state_all(states)
            else:
                device.set_rng_state(states[0])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"the RNG state is malformed: {type(err).__name__}: {err}") from err


# ---- resuming with another config


def _dotted(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        return {k: v for key, sub in value.items() for k, v in _dotted(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def _resumable(name: str) -> bool:
    return any(name == c or (c.endswith(".") and name.startswith(c)) for c in RESUMABLE_CHANGES)


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`field: old -> new` for every dotted field of two configs (as model_dump(mode="json")) that differs,
    except those in RESUMABLE_CHANGES. Fields present in one config only (another architecture's) count."""
    before, after = _dotted(old), _dotted(new)
    missing = "<absent>"
    return [f"{name}: {before.get(name, missing)!r} -> {after.get(name, missing)!r}"
            for name in sorted(before.keys() | after.keys())
            if not _resumable(name) and before.get(name, missing) != after.get(name, missing)]


def replace(target: Path, new: Path) -> None:
    """Rank 0: put the complete checkpoint `new` in place of the complete `target` of the same step."""
    replaced = target.with_name(f".old-{target.name}")
    if replaced.exists():  # left by a crash between the two renames below; `target` is the newer
        shutil.rmtree(replaced)
    target.rename(replaced)
    new.rename(target)
    shutil.rmtree(replaced)


def ema_file(name: str) -> str:
    """The EMA weights of model `name` in a checkpoint: the first model's keep the name readers know."""
    return EMA_WEIGHTS if name == "model" else f"ema_{name}.safetensors"


def refuse_changes(config: dict[str, Any], spec: dict, meta: dict, path: Path, world: int, global_batch: int) -> None:
    """Raise CheckpointError naming every field in which this run differs from the checkpoint it would resume,
    except RESUMABLE_CHANGES: a run resumed with another batch size, world size, model or optimiser
    would silently mix two runs (or die in load_state_dict)."""
    changes = config_changes(meta.get("config", {}), config)
    for name, now in (("world size", world), ("global batch", global_batch), ("model spec", spec)):
        key = name.replace(" ", "_")
        if key in meta and meta[key] != now:
            changes.append(f"{name}: {meta[key]!r} -> {now!r}")
    if changes:
        raise CheckpointError(
            f"cannot resume {path} with a changed config ({len(changes)} field(s), checkpoint -> now): "
            + "; ".join(changes) + ". Resume with the checkpoint's values (its meta.json holds the config), or "
            "start a new --train.output_dir. Fields that may change on resume: " + ", ".join(
                c + "*" if c.endswith(".") else c for c in RESUMABLE_CHANGES)
        )


def no_space_error(err: BaseException, output_dir: Path, needed: int) -> CheckpointError | None:
    """A CheckpointError saying the disk under `output_dir` is full, or None when `err` is something else.
    torch.save reports a full disk as a RuntimeError ("basic_ios::clear: iostream error", "file write failed")
    without an errno, so the free space decides there."""
    root = checkpoint_root(output_dir)
    free = shutil.disk_usage(root if root.is_dir() else output_dir).free
    if not ((isinstance(err, OSError) and err.errno == errno.ENOSPC) or free < needed):
        return None
    kept = [p.name for p in complete_checkpoints(output_dir)]
    return CheckpointError(
        f"no space left on {root}: a checkpoint needs about {needed:,} bytes and {free:,} are free "
        f"({type(err).__name__}: {err}). The older checkpoints are kept ({', '.join(kept) or 'none'}); free space "
        "or move --train.output_dir, then continue with --train.resume true"
    )
