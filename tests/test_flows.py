"""The Prefect flows and the `vaepipe` command: ingestion, bad input, cancellation (`vaepipe serve`: test_serve.py).

Prefect reads its settings once, at import, so PREFECT_HOME is redirected with `temporary_settings` for this
process and through the environment for child processes: the tests never touch ~/.prefect.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from conftest import BIN, run, stop

import pipeline
from flows.ingest import ingest_dataset
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

