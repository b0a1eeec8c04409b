"""Faults of issue 6, each test asserting nothing was lost: a tracking server that stops and comes back, and
corrupt shards met during training (reported and skipped, or the run stops naming the shard)."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run, write_numbered_shards
from support import training
from support.journal import PRESET, entries, journal_of, sent, train_argv
from support.servers import MlflowServer, kill_group
from support.training import in_process

from pipeline import ShardFormatError, ShardLoader, open_loader, read_split
from pipeline.loader import CorruptShardError
from vae.tracking import journal as journal_module
from vae.tracking.journal import JOURNAL_DIR, MetricJournal, sync_journal

BAD = "train-000001.tar"


# ---- corrupting a shard after its index was written


def _member_offsets(shard: Path) -> list[tuple[int, int]]:
    """(header offset, data offset) of each member of a tar file."""
    with tarfile.open(shard) as tar:
        return [(m.offset, m.offset_data) for m in tar.getmembers()]


def corrupt(shard: Path, how: str) -> None:
    data = bytearray(shard.read_bytes())
    members = _member_offsets(shard)
    if how == "truncated":  # cut inside a block's pixels
        data = data[: members[len(members) // 2][1] + 8]
    elif how == "garbled_header":  # a member header in the middle: tar stops reading there
        header = members[len(members) // 2][0]
        data[header : header + 100] = b"\xff" * 100
    elif how == "first_header":  # the shard does not even open as a tar file
        data[:100] = b"\x00garbage" * 12 + b"\x00" * 4
    elif how == "npy_header":  # the first block's images.npy is no longer a .npy array
        data[members[0][1] : members[0][1] + 6] = b"NOTNPY"
    elif how == "flipped_pixel":  # only the sha256 (data.verify) can tell
        data[members[0][1] + 200] ^= 0xFF
    else:
        raise ValueError(how)
    shard.write_bytes(bytes(data))


KINDS = ["truncated", "garbled_header", "first_header", "npy_header", "flipped_pixel"]


@pytest.fixture
def numbered(tmp_path) -> Path:
    """Four shards of 16 numbered samples (label i for sample i); the second, samples 16..31, is corrupt."""
    return write_numbered_shards(tmp_path / "shards", [16, 16, 16, 16], block_size=4)


def labels_of(loader: ShardLoader, epoch: int = 0) -> list[int]:
    loader.set_epoch(epoch)
    return [int(i) for batch in loader for i in batch.labels]


@pytest.mark.parametrize("resident", ["off", "on"])
@pytest.mark.parametrize("how", KINDS)
def test_fail_policy_stops_naming_the_shard_and_the_fix(numbered, how, resident):
    corrupt(numbered / BAD, how)
    loader = open_loader(numbered, "train", batch_size=4, shuffle_buffer=8, resident=resident,
                         verify=how == "flipped_pixel")
    fix = rf"(?s){BAD} .*the shard is corrupt.*vaepipe verify .*re-run the ingest"
    with pytest.raises(CorruptShardError, match=fix):
        labels_of(loader)


@pytest.mark.parametrize("resident", ["off", "on"])
@pytest.mark.parametrize("how", KINDS)
def test_skip_policy_reads_exactly_the_other_shards(numbered, how, resident, caplog):
    corrupt(numbered / BAD, how)
    loader = open_loader(numbered, "train", batch_size=4, shuffle_buffer=8, resident=resident,
                         verify=how == "flipped_pixel", on_corrupt="skip")
    with caplog.at_level(logging.WARNING, logger="pipeline.loader"):
        epochs = [labels_of(loader, epoch) for epoch in (0, 1)]
    others = set(range(64)) - set(range(16, 32))
    for seen in epochs:
        assert len(seen) == 64  # the batch count does not change: the rank pads its slice
        assert set(seen) == others  # not one sample of the corrupt shard, every sample of the others
    assert list(loader.skipped_shards) == [BAD]
    warnings = [r.getMessage() for r in caplog.records if "skipping corrupt shard" in r.getMessage()]
    assert len(warnings) == 1 and BAD in warnings[0]  # reported once, not re-read in the next epoch


@pytest.mark.parametrize("resident", ["off", "on"])
def test_skipping_keeps_ranks_in_step(numbered, resident):
    """Two ranks: only rank 0's slice holds the corrupt shard (shuffle off), yet both yield the same number of
    batches (DDP would hang otherwise), and together they cover every other sample."""
    corrupt(numbered / BAD, "truncated")
    ranks = [open_loader(numbered, "train", batch_size=4, rank=r, world_size=2, shuffle=False, resident=resident,
                         on_corrupt="skip") for r in (0, 1)]
    seen = [labels_of(loader) for loader in ranks]
    assert [len(s) for s in seen] == [32, 32] and len(ranks[0]) == len(ranks[1]) == 8
    assert set(seen[0]) | set(seen[1]) == set(range(64)) - set(range(16, 32))
    if resident == "off":  # streamed, rank 1's slice is untouched, and only rank 0 ever read the bad shard
        assert set(seen[1]) == set(range(32, 64))
        assert list(ranks[0].skipped_shards) == [BAD] and ranks[1].skipped_shards == {}
    else:  # resident, every rank reads the whole split and skips the same shard
        assert all(list(loader.skipped_shards) == [BAD] for loader in ranks)


def test_evaluation_skips_without_padding(numbered):
    corrupt(numbered / BAD, "garbled_header")
    images, labels = read_split(numbered, "train", on_corrupt="skip")
    assert sorted(labels.tolist()) == sorted(set(range(64)) - set(range(16, 32)))  # no repeats when not padding
    assert len(images) == 48
    with pytest.raises(CorruptShardError, match=BAD):
        read_split(numbered, "train")


def test_all_shards_corrupt_is_an_error_not_an_endless_pad(tmp_path):
    shard_dir = write_numbered_shards(tmp_path, [8, 8], block_size=4)
    for shard in shard_dir.glob("*.tar"):
        corrupt(shard, "truncated")
    loader = open_loader(shard_dir, "train", batch_size=4, on_corrupt="skip", resident="off")
    with pytest.raises(ShardFormatError, match="no readable shard is left"):
        labels_of(loader)


# ---- the journal, without a server


def test_a_hung_server_costs_one_short_timeout_then_backs_off(tmp_path, monkeypatch):
    """A server that accepts connections and never answers: the first flush makes one attempt under MLflow's
    settings of one try of SEND_TIMEOUT_S (not MLflow's 7 retries of 120 s), the next log makes none (back-off),
    and every entry stays in the journal, timestamps fixed. Asserted on the attempts and their settings, not on
    durations: on a loaded machine the first MLflow import alone can take longer than the timeout."""
    attempts = []
    real_send = MetricJournal.send

    def counted_send(journal):
        attempts.append((os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES"),
                         os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT")))
        return real_send(journal)

    monkeypatch.setattr(MetricJournal, "send", counted_send)
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)  # the kernel completes the handshakes; nobody ever reads or answers
        uri = f"http://127.0.0.1:{hung.getsockname()[1]}"
        journal = MetricJournal(tmp_path / "j" / "run.jsonl", "0" * 32, uri)
        journal.log_metrics({"train/loss": 1.5}, step=1)
        assert journal.down_since is not None  # the attempt failed: the server never answered
        journal.log_metrics({"train/loss": 1.25}, step=2)
    assert attempts == [("0", str(journal_module.SEND_TIMEOUT_S))]  # one short try, then backing off
    lines = [json.loads(line) for line in (tmp_path / "j" / "run.jsonl").read_text().splitlines()]
    assert [(e["step"], e["metrics"]) for e in lines] == [(1, {"train/loss": 1.5}), (2, {"train/loss": 1.25})]
    assert [e["timestamp"] for e in journal.pending] == [e["timestamp"] for e in lines]
    assert not (tmp_path / "j" / "run.sent").exists()  # nothing acknowledged


def test_unknown_metric_names_are_refused_before_anything_is_written(tmp_path):
    journal = MetricJournal(tmp_path / "run.jsonl", "0" * 32, "http://127.0.0.1:9")
    with pytest.raises(ValueError, match="not among the fixed names"):
        journal.log_metrics({"train/lost": 1.0}, step=1)
    assert not (tmp_path / "run.jsonl").exists()


def test_a_torn_last_line_is_cut_and_the_rest_kept(tmp_path):
    path = tmp_path / "run.jsonl"
    entry = {"kind": "metrics", "step": 5, "timestamp": 1, "metrics": {"train/loss": 2.0}}
    path.write_text(json.dumps(entry) + "\n" + '{"kind": "metr')
    journal = MetricJournal(path, "0" * 32, "http://127.0.0.1:9")
    assert journal.pending == [entry]
    assert path.read_text() == json.dumps(entry) + "\n"


class TakesEverything:
    """An MLflow client whose server takes every request."""

    def log_batch(self, run_id, metrics=()):
        pass

    def update_run(self, run_id, status):
        pass

    def set_terminated(self, run_id, status, end_time=None):
        pass


def test_a_full_disk_after_delivery_is_not_blamed_on_mlflow(tmp_path, monkeypatch, caplog):
    """MLflow took the entries; only recording their count failed (ENOSPC). The journal once said 'MLflow did not
    take run's metrics' and kept resending them; it now says what happened, and they count as sent."""
    journal = MetricJournal(tmp_path / "run.jsonl", "0" * 32, "http://127.0.0.1:9")
    journal._client = TakesEverything()

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(journal_module.os, "replace", full)
    with caplog.at_level("WARNING", logger="vae.tracking"):
        journal.log_metrics({"train/loss": 1.5}, step=1)
    assert journal.pending == [] and journal.down_since is None
    assert "did not take" not in caplog.text
    assert "MLflow took 1 entries" in caplog.text and f"no space left on {tmp_path}" in caplog.text


def test_a_full_disk_while_journaling_names_the_directory(tmp_path, monkeypatch):
    journal = MetricJournal(tmp_path / "run.jsonl", "0" * 32, "http://127.0.0.1:9")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(journal_module, "open", full, raising=False)  # the module's `open`, ahead of the builtin
    with pytest.raises(OSError, match=f"no space left on {tmp_path}: the metric journal could not write"):
        journal.log_metrics({"train/loss": 1.5}, step=1)


# ---- a real MLflow server that stops and comes back


@pytest.fixture(scope="module")
def restartable_server(tmp_path_factory) -> MlflowServer:
    """One MLflow server for this module's outages: each test stops it and brings it back on the same port and
    database (the runs of one test are not another's)."""
    with MlflowServer(tmp_path_factory.mktemp("mlflow-server")) as srv:
        yield srv


@pytest.fixture
def server(restartable_server, monkeypatch) -> MlflowServer:
    """The module's server, running (a failed test may have left it stopped), as this test's tracking URI."""
    import mlflow

    if not restartable_server.running:
        restartable_server.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", restartable_server.uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(restartable_server.uri)
    return restartable_server


def wait_for(predicate, what: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training exited with {proc.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout} s for {what}")
        time.sleep(0.05)


def train_until_metrics_arrive(tmp_path, shard_dir, epochs: int, every: int, count: int) -> subprocess.Popen:
    """A training run in its own session, returned once more than `count` journal entries reached the server."""
    proc = subprocess.Popen(train_argv(tmp_path, shard_dir, "--train.epochs", str(epochs), "--train.log_every",
                                       str(every)),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    journal_dir = tmp_path / "run" / JOURNAL_DIR
    try:
        wait_for(lambda: any(journal_dir.glob("*.sent")) and sent(journal_of(tmp_path)) > count,
                 "the first metrics to reach the server", proc)
    except BaseException:
        kill_group(proc)
        raise
    return proc


def expected_train_steps(steps_per_epoch: int, epochs: int, every: int) -> list[int]:
    """The steps the loop logs training metrics at: every `every` steps and at each epoch's last batch."""
    ends = {steps_per_epoch * e for e in range(1, epochs + 1)}
    return sorted({s for s in range(1, steps_per_epoch * epochs + 1) if s % every == 0} | ends)


def assert_server_holds_the_journal(uri: str, path: Path, run_id: str, steps_per_epoch: int, epochs: int,
                                    every: int) -> None:
    """Every metric point of the journal is in the run exactly once (same step, timestamp and value), and the
    journal holds every step the training logged."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    journaled: dict[str, list[tuple]] = {}
    for e in entries(path):
        if e["kind"] == "metrics":
            for key, value in e["metrics"].items():
                journaled.setdefault(key, []).append((e["step"], e["timestamp"], value))
    assert [s for s, _, _ in journaled["train/loss"]] == expected_train_steps(steps_per_epoch, epochs, every)
    assert [s for s, _, _ in journaled["val/elbo"]] == [steps_per_epoch * e for e in range(1, epochs + 1)]
    assert set(journaled) >= {"train/elbo", "train/kl", "train/lr", "train/skipped_shards", "val/skipped_shards"}
    for key, points in journaled.items():
        history = client.get_metric_history(run_id, key)
        stored = sorted((m.step, m.timestamp, m.value) for m in history)
        assert stored == sorted(points), key  # nothing lost, nothing twice


def test_server_stops_mid_training_and_comes_back(tmp_path, digits_shards, server):
    """Stop the server after some metrics arrived, let training log through the outage, bring the server back
    on the same port and database while training still runs: training finishes and the run holds every point."""
    every, epochs = 1, 2  # 2 x 22 steps: short on a busy CPU, long enough to outlast a server stop
    proc = train_until_metrics_arrive(tmp_path, digits_shards, epochs, every, count=3)
    try:
        path = journal_of(tmp_path)
        server.stop()
        at_stop = len(entries(path))
        wait_for(lambda: len(entries(path)) >= at_stop + 10, "ten journal entries written while the server is down",
                 proc)
        os.killpg(proc.pid, signal.SIGSTOP)  # hold training while the server starts (seconds), so it returns mid-run
        down = entries(path)
        try:
            assert sent(path) < len(down)  # entries really are held back
            server.start()
        finally:
            os.killpg(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    assert proc.returncode == 0, err[-3000:]
    assert "did not take run" in err and "answers again" in err  # the outage and the return are both logged
    assert "python -m vae.tracking" not in err  # nothing was left for a manual sync
    run_id = path.stem
    assert sent(path) == len(entries(path))  # the journal is drained
    meta = json.loads(sorted((tmp_path / "run" / "checkpoints").glob("*/meta.json"))[-1].read_text())
    assert meta["mlflow_run_id"] == run_id and meta["epoch"] == epochs
    assert_server_holds_the_journal(server.uri, path, run_id, meta["steps_per_epoch"], epochs, every)
    import mlflow

    assert mlflow.MlflowClient(server.uri).get_run(run_id).info.status == "FINISHED"


def test_server_down_at_the_end_then_documented_sync(tmp_path, digits_shards, server):
    """The server stops mid-run and is still down when training ends: training finishes, says how to sync; the
    documented command sends everything; a second sync with the acknowledgements lost adds no duplicate."""
    import mlflow

    every, epochs = 2, 1
    proc = train_until_metrics_arrive(tmp_path, digits_shards, epochs, every, count=1)
    try:
        server.stop()
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    assert proc.returncode == 0, err[-3000:]
    path = journal_of(tmp_path)
    run_id = path.stem
    command = f"python -m vae.tracking {path} {run_id} --uri {server.uri}"
    assert command in err  # the log says exactly how to send the rest
    held = len(entries(path)) - sent(path)
    assert held > 0 and entries(path)[-1]["status"] == "FINISHED"

    server.start()
    result = run([sys.executable, "-m", "vae.tracking", str(path), run_id, "--uri", server.uri], cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"sent {held} entries" in result.stdout
    meta = json.loads(sorted((tmp_path / "run" / "checkpoints").glob("*/meta.json"))[-1].read_text())
    assert_server_holds_the_journal(server.uri, path, run_id, meta["steps_per_epoch"], epochs, every)
    assert mlflow.MlflowClient(server.uri).get_run(run_id).info.status == "FINISHED"

    # A batch that reached the server but whose answer was lost is sent again, identical: MLflow keeps one copy.
    path.with_suffix(".sent").unlink()
    assert sync_journal(path, run_id, server.uri) == len(entries(path))
    assert_server_holds_the_journal(server.uri, path, run_id, meta["steps_per_epoch"], epochs, every)


def test_preempted_while_the_server_is_down_then_resumed(tmp_path, digits_shards, server):
    """SIGTERM while the server is down: the checkpoint is written and the unsent metrics stay in the journal;
    the resume (server back) sends them first, and the run ends up with every point once, FINISHED."""
    import mlflow

    every, epochs = 2, 2
    argv = train_argv(tmp_path, digits_shards, "--train.epochs", str(epochs), "--train.log_every", str(every))
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        journal_dir = tmp_path / "run" / JOURNAL_DIR
        wait_for(lambda: journal_dir.is_dir() and any(journal_dir.glob("*.sent")), "the first metrics", proc)
        path = journal_of(tmp_path)
        server.stop()
        at_stop = len(entries(path))
        wait_for(lambda: len(entries(path)) >= at_stop + 3, "journal entries written while the server is down", proc)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    assert proc.returncode == 75, err[-3000:]
    assert "python -m vae.tracking" in err and entries(path)[-1]["status"] == "KILLED"
    assert sent(path) < len(entries(path))

    server.start()
    resumed = run([*argv, "--train.resume", "true"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run_id = path.stem
    assert sent(path) == len(entries(path))
    assert [e["status"] for e in entries(path) if e["kind"] == "status"] == ["RUNNING", "KILLED", "RUNNING",
                                                                             "FINISHED"]
    meta = json.loads(sorted((tmp_path / "run" / "checkpoints").glob("*/meta.json"))[-1].read_text())
    assert_server_holds_the_journal(server.uri, path, run_id, meta["steps_per_epoch"], epochs, every)
    assert mlflow.MlflowClient(server.uri).get_run(run_id).info.status == "FINISHED"


# ---- corrupt shards in a real training run


@pytest.fixture
def corrupt_digits(tmp_path, digits_shards) -> Path:
    copy = tmp_path / "shards"
    shutil.copytree(digits_shards, copy)
    corrupt(copy / BAD, "truncated")
    return copy


def test_training_stops_naming_a_corrupt_shard(tmp_path, corrupt_digits, tracking_uri, capsys):
    """vae/train.py's entry point, in this process: one error line naming the shard and both fixes, status 1."""
    from vae.train import main

    with in_process(tracking_uri), pytest.raises(SystemExit) as stopped:
        main(["--config", str(PRESET), "--ingest.shard_dir", str(corrupt_digits), "--train.output_dir",
              str(tmp_path / "run"), "--train.epochs", "1", "--tracking.finalize", "false"])
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    assert f"error: {(corrupt_digits / BAD).resolve()} " in err and "the shard is corrupt" in err
    assert "vaepipe verify" in err and "data.on_corrupt_shard skip" in err and "Traceback" not in err
    assert not list((tmp_path / "run").glob("checkpoints/*/meta.json"))  # it stopped before any checkpoint


@pytest.mark.parametrize("resident", ["on", "off"])
def test_training_skips_a_corrupt_shard_and_reports_it(tmp_path, corrupt_digits, tracking_uri, resident, capsys,
                                                       caplog):
    import mlflow

    with in_process(tracking_uri):
        training.train(corrupt_digits, tmp_path / "run", "--train.epochs", "1", "--train.batch_size", "64",
                       "--data.on_corrupt_shard", "skip", "--data.resident", resident)
    assert f"skipping corrupt shard {(corrupt_digits / BAD).resolve()}" in caplog.text
    assert f"train ['{BAD}']" in capsys.readouterr().out  # the trainer's per-epoch summary
    meta = json.loads(sorted((tmp_path / "run" / "checkpoints").glob("*/meta.json"))[-1].read_text())
    assert meta["steps_per_epoch"] == meta["global_step"] == 1438 // 64  # the same steps as with every shard
    history = mlflow.MlflowClient(tracking_uri).get_metric_history(meta["mlflow_run_id"], "train/skipped_shards")
    assert [(m.step, m.value) for m in history] == [(22, 1.0)]
    assert np.isfinite(meta["val"]["val/elbo"])
