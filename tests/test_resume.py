"""Resume that fails safe: a changed config is refused naming the fields, a checkpoint loads no code, a damaged
newest checkpoint falls back to the newest one that loads, and a full disk keeps the older checkpoints."""

from __future__ import annotations

import errno
import json
import pickle
import shutil
from pathlib import Path

import pytest
from support import training
from support.training import in_process

from vae.training import checkpoint
from vae.training.errors import TrainingError

# In-process runs (tests/support/training.py) of 5 steps of 256 per epoch, keeping the two newest checkpoints.
KEEP_TWO = ("--train.keep_checkpoints", "2")


def train(shard_dir: Path, out: Path, *overrides: str) -> None:
    training.train(shard_dir, out, *KEEP_TWO, *overrides)


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory, digits_shards, tracking_uri) -> Path:
    """A run of two epochs: checkpoints step-000000005 and step-000000010 (copy it before changing it)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    with in_process(tracking_uri):
        train(digits_shards, out, "--train.epochs", "2")
    assert [p.name for p in checkpoint.complete_checkpoints(out)] == ["step-000000005", "step-000000010"]
    return out


@pytest.fixture
def copy(two_epochs, tmp_path, tracking_uri) -> Path:
    with in_process(tracking_uri):
        yield Path(shutil.copytree(two_epochs, tmp_path / "run"))


def resume(shard_dir: Path, out: Path, *overrides: str) -> None:
    train(shard_dir, out, "--train.resume", "true", *overrides)


# ---- item 2: a changed config is refused, naming each field


def test_resume_refuses_a_changed_config_naming_each_field(copy, digits_shards):
    with pytest.raises(TrainingError) as refused:
        resume(digits_shards, copy, "--train.epochs", "3", "--train.batch_size", "64", "--model.latent_dim", "4",
               "--optim.name", "lamb", "--train.log_every", "3")
    message = str(refused.value)
    assert "cannot resume" in message and "step-000000010" in message
    for change in ("train.batch_size: 256 -> 64", "model.latent_dim: 2 -> 4", "optim.name: 'adam' -> 'lamb'",
                   "global batch: 256 -> 64"):
        assert change in message, message
    assert "train.epochs:" not in message and "train.log_every:" not in message  # these may change on resume
    assert [p.name for p in checkpoint.complete_checkpoints(copy)] == ["step-000000005", "step-000000010"]


def test_a_changed_architecture_is_refused_before_any_load(copy, digits_shards):
    with pytest.raises(TrainingError, match="model.arch: 'conv' -> 'mlp'"):
        resume(digits_shards, copy, "--train.epochs", "3", "--model.arch", "mlp")


def test_allowed_changes_resume(copy, digits_shards, capsys):
    resume(digits_shards, copy, "--train.epochs", "3", "--train.log_every", "2", "--tracking.run_name", "again")
    assert f"resuming from {copy / 'checkpoints' / 'step-000000010'} (epoch 2" in capsys.readouterr().out
    assert checkpoint.latest(copy).name == "step-000000015"


def test_config_changes_compares_any_dotted_field():
    old = {"model": {"arch": "conv", "width": 32}, "train": {"epochs": 1, "batch_size": 8}, "tracking": {"x": 1}}
    new = {"model": {"arch": "mlp", "hidden_dim": 400}, "train": {"epochs": 5, "batch_size": 8}, "tracking": {"x": 2}}
    assert checkpoint.config_changes(old, new) == [
        "model.arch: 'conv' -> 'mlp'", "model.hidden_dim: '<absent>' -> 400", "model.width: 32 -> '<absent>'"]


# ---- item 3: a checkpoint loads no code


class Planted:
    """A pickle that, when loaded, touches a marker file: what an attacker with write access to the volume plants."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def plant(path: Path, marker: Path) -> None:
    """Replace `path` with the malicious pickle, padded to its old size (pickle ignores what follows STOP), so a
    size check cannot be what stops it: only never unpickling does."""
    payload = pickle.dumps(Planted(marker))
    old_size = path.stat().st_size if path.exists() else 0
    path.write_bytes(payload + b" " * max(0, old_size - len(payload)))


def test_the_planted_pickle_does_run_when_unpickled(tmp_path):
    """The test's own attack works: loading it with pickle creates the marker."""
    marker = tmp_path / "pwned"
    plant(tmp_path / "x.pkl", marker)
    pickle.loads((tmp_path / "x.pkl").read_bytes())
    assert marker.exists()


NEWEST_FILES = ["model.safetensors", "optimizer.bin", "ema.safetensors", "train_state.json", "rng-0.json",
                "meta.json", "custom_checkpoint_0.pkl", "random_states_0.pkl"]  # the last two: Accelerate's names


def fell_back(out: str, newest: Path) -> bool:
    """The resume warned about `newest`, set it aside and resumed from the checkpoint before it."""
    return (f"checkpoint {newest} cannot be loaded" in out and f"moved it to {newest.parent}/unloadable-{newest.name}"
            in out and f"resuming from {newest.parent / 'step-000000005'} (epoch 1" in out)


@pytest.mark.parametrize("name", NEWEST_FILES)
def test_a_planted_pickle_in_the_newest_checkpoint_never_runs(copy, digits_shards, tmp_path, capsys, name):
    newest = copy / "checkpoints" / "step-000000010"
    marker = tmp_path / "pwned"
    plant(newest / name, marker)
    resume(digits_shards, copy, "--train.epochs", "2")
    assert not marker.exists(), f"unpickling {name} ran code"
    out = capsys.readouterr().out
    assert fell_back(out, newest) and name in out, out[-3000:]  # the warning names the file it did not load
    assert (copy / "checkpoints" / "unloadable-step-000000010" / name).is_file()  # kept for inspection
    assert checkpoint.latest(copy).name == "step-000000010"  # trained again from step 5


def test_pickles_planted_in_every_file_of_every_checkpoint_never_run(copy, digits_shards, tmp_path):
    marker = tmp_path / "pwned"
    for path in checkpoint.complete_checkpoints(copy):
        for name in {f.name for f in path.iterdir()} - {"meta.json"} | {"custom_checkpoint_0.pkl"}:
            plant(path / name, marker)
    with pytest.raises(TrainingError) as refused:
        resume(digits_shards, copy, "--train.epochs", "3")
    assert not marker.exists()
    message = str(refused.value)
    assert "no checkpoint in" in message and "step-000000005: " in message and "step-000000010: " in message
    assert [p.name for p in checkpoint.complete_checkpoints(copy)] == ["step-000000005", "step-000000010"]  # kept


def test_checkpoints_hold_no_pickle(two_epochs):
    for path in checkpoint.complete_checkpoints(two_epochs):
        names = {f.name for f in path.iterdir()}
        assert names == {"model.safetensors", "optimizer.bin", "ema.safetensors", "train_state.json", "rng-0.json",
                         "meta.json"}
        meta = json.loads((path / "meta.json").read_text())
        assert meta["format"] == checkpoint.FORMAT and set(meta["files"]) == names - {"meta.json"}


# ---- item 4: a damaged newest checkpoint falls back to the newest one that loads


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.bin", "rng-0.json", "train_state.json"])
def test_a_truncated_newest_checkpoint_falls_back_with_a_warning(copy, digits_shards, capsys, name):
    newest = copy / "checkpoints" / "step-000000010"
    with open(newest / name, "r+b") as f:
        f.truncate((newest / name).stat().st_size // 2)
    resume(digits_shards, copy, "--train.epochs", "2")
    out = capsys.readouterr().out
    assert fell_back(out, newest) and f"{name} has" in out and "truncated" in out, out[-3000:]
    assert checkpoint.latest(copy).name == "step-000000010"


def test_a_torn_meta_json_falls_back(copy, digits_shards, capsys):
    newest = copy / "checkpoints" / "step-000000010"
    (newest / "meta.json").write_text((newest / "meta.json").read_text()[:100])
    resume(digits_shards, copy, "--train.epochs", "2")
    out = capsys.readouterr().out
    assert fell_back(out, newest) and "meta.json cannot be read" in out, out[-3000:]


# ---- item 5: a full disk


def test_a_full_disk_names_the_directory_keeps_older_checkpoints_and_resume_works(tmp_path, digits_shards,
                                                                                   tracking_uri, monkeypatch):
    """The second checkpoint's model write fails with ENOSPC, as on a full tmpfs."""
    import accelerate.utils.other

    out = tmp_path / "run"
    real_save, saves = accelerate.utils.other.safe_save_file, []

    def save_until_full(*args, **kwargs):
        saves.append(args[1])
        if len(saves) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(accelerate.utils.other, "safe_save_file", save_until_full)
    with in_process(tracking_uri), pytest.raises(TrainingError) as failed:
        train(digits_shards, out, "--train.epochs", "2")
    message = str(failed.value)
    first = out / "checkpoints" / "step-000000005"
    assert f"no space left on {out / 'checkpoints'}" in message
    assert f"needs about {checkpoint.size(first):,} bytes" in message  # the size of the previous checkpoint
    assert "older checkpoints are kept (step-000000005)" in message and "--train.resume true" in message
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000000005"]  # the partial one removed

    monkeypatch.setattr(accelerate.utils.other, "safe_save_file", real_save)  # space freed
    with in_process(tracking_uri):
        resume(digits_shards, out, "--train.epochs", "2")
    assert [p.name for p in checkpoint.complete_checkpoints(out)] == ["step-000000005", "step-000000010"]


@pytest.mark.slow
def test_two_ranks_fall_back_together_when_one_rank_cannot_load(tmp_path, digits_shards, tracking_uri):
    """rng-1.json is read by rank 1 only: rank 0 would load the newest checkpoint, and both must skip it."""
    from conftest import run

    from vae.launch.command import accelerate_command

    def launch(*overrides: str):
        argv, env = accelerate_command(training.PRESET, 2, overrides=[
            "--ingest.shard_dir", str(digits_shards), "--train.output_dir", str(tmp_path / "run"), *training.FAST,
            *KEEP_TWO, *overrides])
        return run(argv, env={**env, "MLFLOW_TRACKING_URI": tracking_uri}, cwd=tmp_path)

    first = launch("--train.epochs", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    newest = tmp_path / "run" / "checkpoints" / "step-000000004"  # 1438 // (2 x 256) = 2 steps per epoch
    assert {f.name for f in newest.iterdir()} >= {"rng-0.json", "rng-1.json"}
    (newest / "rng-1.json").write_text("{")
    resumed = launch("--train.epochs", "2", "--train.resume", "true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "warning: rank 1: checkpoint" in resumed.stdout and "rng-1.json has" in resumed.stdout
    assert "step-000000002 (epoch 1" in resumed.stdout
    meta = json.loads((newest / "meta.json").read_text())
    assert meta["world_size"] == 2 and len(set(meta["rank_param_checksums"])) == 1
