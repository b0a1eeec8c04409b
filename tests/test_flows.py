"""The Prefect flows and the `vaepipe` command: ingestion, bad input, cancellation (`vaepipe serve`: test_serve.py).

Prefect reads its settings once, at import, so PREFECT_HOME is redirected with `temporary_settings` for this
process and through the environment for child processes: the tests never touch ~/.prefect.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import BIN, run, stop
from PIL import Image

import pipeline
from flows.ingest_dataset import ingest_dataset
from vae.config import IngestSection, SourceSection

pytestmark = pytest.mark.usefixtures("prefect_home")  # every test here, subprocesses included


def test_ingest_flow_writes_then_reuses_a_complete_shard_dir(tmp_path, prefect_api):
    section = IngestSection(shard_dir=tmp_path / "digits", samples_per_shard=512, block_size=128)
    out = Path(ingest_dataset(SourceSection(), section))
    assert out == (tmp_path / "digits").resolve()
    assert pipeline.is_complete(out)
    index = pipeline.read_index(out)
    assert set(index.splits) == {"train", "test"}
    assert sum(s.num_samples for s in index.splits.values()) == 1797  # all of scikit-learn's digits
    assert len(index.splits["train"].shards) > 1  # 512 per shard: the split fanned out into several
    stamp = (out / pipeline.INDEX_NAME).stat().st_mtime_ns

    assert ingest_dataset(SourceSection(), section) == str(out)
    assert (out / pipeline.INDEX_NAME).stat().st_mtime_ns == stamp  # reused, not rewritten


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--train.mixed_precision", "fp8"], ["train.mixed_precision", "'no', 'bf16' or 'fp16'", "fp8"]),
        (["--config", "no/such/preset.yaml"], ["no/such/preset.yaml", "does not exist"]),
        (["--train.no_such_field", "1"], ["--train.no_such_field", "batch_size"]),
    ],
)
def test_demo_rejects_bad_config_before_any_work(tmp_path, args, expected):
    result = run([str(BIN / "vaepipe"), "demo", *args], cwd=tmp_path, timeout=60)
    assert result.returncode == 2, result.stderr
    for text in expected:
        assert text in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.fixture
def unwritable_dir(tmp_path) -> Path:
    """A directory this user cannot create files in (root ignores modes: then a sysfs directory, which it cannot)."""
    if os.geteuid() != 0:
        locked = tmp_path / "read-only"
        locked.mkdir(mode=0o555)
        return locked
    if not Path("/sys/kernel").is_dir():
        pytest.skip("running as root and /sys/kernel is absent: no directory here that root cannot write")
    return Path("/sys/kernel")


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong_root", ["error: imagefolder source:", "is not a directory", "set source.options.root"]),
        ("read_only", ["error: shard directory", "is not writable", "set ingest.shard_dir"]),
        ("a_file", ["error: shard directory", "is a file; set ingest.shard_dir to a directory"]),
        ("foreign", ["error:", "holds no shards of vaepipe", "train-000050.tar", "or empty this one"]),
    ],
)
def test_ingest_refuses_bad_input_in_one_line_before_prefect_starts(tmp_path, unwritable_dir, case, expected):
    """A wrong root or an unusable destination: one line, exit status 2, no traceback, no retries, no flow run."""
    photos = tmp_path / "photos"
    photos.mkdir()
    (tmp_path / "a-file").write_text("not a directory")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "train-000050.tar").write_bytes(b"someone else's shard")
    root, shard_dir = {
        "wrong_root": (tmp_path / "no-such-folder", tmp_path / "shards"),
        "read_only": (photos, unwritable_dir / "shards"),
        "a_file": (photos, tmp_path / "a-file"),
        "foreign": (photos, tmp_path / "theirs"),
    }[case]
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(photos / "x.png")
    result = run([str(BIN / "vaepipe"), "ingest", "--source.name", "imagefolder", "--source.options",
                  f"{{root: {root}}}", "--ingest.shard_dir", str(shard_dir)], cwd=tmp_path, timeout=180)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for text in expected:
        assert text in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "Retry" not in result.stderr + result.stdout
    assert (tmp_path / "theirs" / "train-000050.tar").read_bytes() == b"someone else's shard"
    assert not (tmp_path / "shards").exists() or not any((tmp_path / "shards").iterdir())


def _processes_mentioning(text: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["status"] != psutil.STATUS_ZOMBIE and text in " ".join(proc.info["cmdline"] or []):
            found.append(proc)
    return found


@pytest.mark.slow
def test_terminating_the_flow_kills_the_training_process_group(tmp_path):
    """SIGTERM (what a cancelled flow run receives) must take `accelerate launch` and its ranks down too."""
    out = tmp_path / "runs"
    log = tmp_path / "demo.log"
    cmd = [str(BIN / "vaepipe"), "demo", "--train.epochs", "10000", "--train.output_dir", str(out),
           "--ingest.shard_dir", str(tmp_path / "shards")]
    with open(log, "w") as f:
        demo = subprocess.Popen(cmd, cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not any("vae/train.py" in " ".join(p.cmdline()) for p in _processes_mentioning(str(out))):
            assert demo.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "training never started:\n" + log.read_text()
            time.sleep(0.5)
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(timeout=60) != 0
        deadline = time.monotonic() + 30
        while _processes_mentioning(str(out)):
            assert time.monotonic() < deadline, f"training outlived the flow: {_processes_mentioning(str(out))}"
            time.sleep(0.5)
    finally:
        stop(demo)
        for proc in _processes_mentioning(str(out)):  # leave nothing behind even when the test fails
            proc.kill()

