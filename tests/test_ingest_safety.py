"""An ingest never deletes what it did not write, and two ingests never share a shard directory at once."""

from __future__ import annotations

import importlib
import json
import logging
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO

import pipeline
from pipeline import DestinationError, DirectoryLockedError, DirLock
from pipeline.lock import LOCK_NAME
from pipeline.storage import Location

SHAPES = {"train_samples": 1500, "test_samples": 10, "size": 16}


def test_a_foreign_directory_is_refused_and_left_as_it_was(tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "train-000050.tar").write_bytes(b"someone else's shard")
    (out / "notes.txt").write_text("keep me")
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(DestinationError, match=r"not empty and holds no shards of vaepipe.*notes.txt, train-000050.tar"
                                               r".*choose another ingest.shard_dir, or empty this one"):
        pipeline.ingest("digits", {}, out, 512, 128, progress=False)
    assert sorted(p.name for p in out.iterdir()) == before  # nothing deleted, nothing left behind (no .ingest/)
    assert (out / "train-000050.tar").read_bytes() == b"someone else's shard"


def test_a_foreign_shard_in_our_directory_is_never_deleted(tmp_path):
    pipeline.ingest("digits", {}, tmp_path, 512, 128, progress=False)
    (tmp_path / "train-000050.tar").write_bytes(b"copied in by hand")
    with pytest.raises(DestinationError, match=r"shard files that no index.json or .ingest/ marker of vaepipe lists: "
                                               r"train-000050.tar.*move them elsewhere"):
        pipeline.ingest("digits", {}, tmp_path, 256, 128, progress=False, overwrite=True)
    assert (tmp_path / "train-000050.tar").read_bytes() == b"copied in by hand"
    assert pipeline.verify(tmp_path) == []  # the refused run changed nothing: the old index still holds


def test_the_partial_shards_of_an_interrupted_group_are_ours_to_replace(tmp_path, monkeypatch):
    """A group killed mid-write leaves a shard no marker lists; its claim says it is ours, so a re-run replaces it."""
    ingest_module = importlib.import_module("pipeline.ingestion.group")  # where write_group finds _conformed
    conformed = ingest_module._conformed
    calls = []

    def dies_in_group_one(items, plan, split, skipped):  # groups run in order here: train 0, train 1, ...
        calls.append(split)
        for n, record in enumerate(conformed(items, plan, split, skipped)):
            if len(calls) == 2 and n == 200:  # one block of 128 is in train-000001.tar by now
                raise RuntimeError("killed")
            yield record

    monkeypatch.setattr(ingest_module, "_conformed", dies_in_group_one)
    with pytest.raises(RuntimeError, match="killed"):
        pipeline.ingest("digits", {}, tmp_path, 256, 128, progress=False)
    assert (tmp_path / "train-000001.tar").exists() and (tmp_path / ".ingest" / "train-000001.claim").exists()
    monkeypatch.setattr(ingest_module, "_conformed", conformed)
    index = pipeline.ingest("digits", {}, tmp_path, 256, 128, progress=False)
    assert pipeline.verify(tmp_path) == [] and index.splits["train"].num_samples == 1438
    assert all(p.suffix == ".json" for p in (tmp_path / ".ingest").iterdir())  # markers only: no claim, no lock


def _ingest_script(out, seed: int, tmp) -> list[str]:
    """A process that imports everything, says it is ready, waits for `tmp/go`, then ingests shapes of `seed`."""
    code = f"""
import os, pathlib, time
import pipeline
pathlib.Path({str(tmp)!r}, "ready-{seed}").touch()
while not os.path.exists(os.path.join({str(tmp)!r}, "go")):
    time.sleep(0.01)
pipeline.ingest("shapes", {{**{SHAPES!r}, "seed": {seed}}}, {str(out)!r}, 256, 128, progress=False)
"""
    return [sys.executable, "-c", code]


def test_two_processes_racing_into_one_directory_leave_one_consistent_index(tmp_path):
    out = tmp_path / "shards"
    procs = [subprocess.Popen(_ingest_script(out, seed, tmp_path), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    deadline = time.monotonic() + 300
    while not ((tmp_path / "ready-1").exists() and (tmp_path / "ready-2").exists()):
        assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, [p.communicate() for p in procs]
        time.sleep(0.05)
    (tmp_path / "go").touch()  # both start their ingest now
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
    assert sorted(rc == 0 for rc, _ in results) == [False, True], results
    winner = 1 if results[0][0] == 0 else 2
    loser_err = next(err for rc, err in results if rc != 0)
    # the second either found the lock held, or came after the first finished and found another source's shards
    assert "is being written by another ingest: pid" in loser_err or "already holds shards of" in loser_err, loser_err
    assert pipeline.verify(out) == []
    index = pipeline.read_index(out)
    assert index.source["config"]["seed"] == winner
    expected = [r.image for r in pipeline.build_source("shapes", {**SHAPES, "seed": winner}).records("train")]
    np.testing.assert_array_equal(pipeline.read_split(out, "train")[0], np.stack(expected))
    assert not (out / LOCK_NAME).exists()


def test_a_second_process_refuses_a_held_lock_naming_the_holder(tmp_path):
    out = tmp_path / "shards"
    (tmp_path / "go").touch()
    with DirLock(Location(out)):
        second = subprocess.run(_ingest_script(out, 1, tmp_path), cwd=REPO, capture_output=True, text=True,
                                timeout=300)
    assert second.returncode != 0
    assert f"is being written by another ingest: pid {os.getpid()} on host {socket.gethostname()!r}" in second.stderr
    assert "if that process is gone, delete" in second.stderr
    assert not (out / "index.json").exists() and not list(out.glob("*.tar"))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("root", ["local", "memory://lock-test"])
def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog, root):
    location = Location(tmp_path / "shards" if root == "local" else root)
    stale = {"host": socket.gethostname(), "pid": _dead_pid(), "started": "2026-01-01T00:00:00+00:00",
             "token": "dead", "command": "vaepipe ingest"}
    location.write_text(LOCK_NAME, json.dumps(stale))
    with caplog.at_level(logging.WARNING, logger="pipeline.lock"), DirLock(location) as lock:
        assert location.read_text(LOCK_NAME) == json.dumps(lock.record)
        with pytest.raises(DirectoryLockedError, match=f"pid {lock.record['pid']}"):  # now held, by a live process
            DirLock(location).acquire()
    assert f"taking over the stale ingest lock of pid {stale['pid']}" in caplog.text
    assert not location.exists(LOCK_NAME) and not location.glob(f"{LOCK_NAME}.takeover-*")


def test_a_lock_held_on_another_host_is_never_taken_over(tmp_path):
    location = Location(tmp_path)
    other = {"host": "elsewhere", "pid": _dead_pid(), "started": "2026-01-01T00:00:00+00:00", "token": "x"}
    location.write_text(LOCK_NAME, json.dumps(other))
    with pytest.raises(DirectoryLockedError, match=r"pid \d+ on host 'elsewhere'.*delete .*\.ingest/lock"):
        pipeline.ingest("digits", {}, tmp_path, 512, 128, progress=False)
    assert json.loads(location.read_text(LOCK_NAME)) == other
