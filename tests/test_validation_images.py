"""What users see while a model trains (issue 25): the objective's reconstruction grid of each validation, written
into the output directory and sent to MLflow as an image at that step through the metric journal
(vae/tracking/journal.py), so a tracking server that is down loses none and a resend adds none."""

from __future__ import annotations

import logging

import mlflow
import pytest
from PIL import Image
from support import training
from support.journal import entries, logged_image_steps
from support.training import in_process

from vae.tracking.journal import JOURNAL_DIR, MetricJournal, sync_journal
from vae.training import checkpoint
from vae.training.trainer import GRID_KEY, GRIDS_DIR

DOWN = "http://127.0.0.1:9"  # the discard port: nothing listens, every request is refused at once


def test_each_validation_grid_reaches_mlflow_at_its_step(tmp_path, digits_shards, tracking_uri):
    out = tmp_path / "run"
    with in_process(tracking_uri):
        training.train(digits_shards, out, "--train.epochs", "2")
    run_id = checkpoint.read_meta(checkpoint.latest(out))["mlflow_run_id"]
    steps = [5, 10]  # 5 optimiser steps per epoch (support/training.py), a validation after each epoch
    grids = sorted((out / GRIDS_DIR).glob("*.png"))
    assert [p.name for p in grids] == [f"step-{s:09d}.png" for s in steps]
    with Image.open(grids[0]) as grid:  # 32 digits and their reconstructions: 8 rows of 8 tiles of 32 px
        assert grid.size == (8 * 34 + 2, 8 * 34 + 2)
    [journal] = (out / JOURNAL_DIR).glob("*.jsonl")
    assert [(e["key"], e["step"]) for e in entries(journal) if e["kind"] == "image"] == [(GRID_KEY, s) for s in steps]
    client = mlflow.MlflowClient(tracking_uri)
    assert logged_image_steps(client, run_id, GRID_KEY) == steps
    assert client.get_run(run_id).data.tags["mlflow.loggedImages"] == "True"  # what the UI's image view reads


def test_an_image_journaled_while_mlflow_is_down_goes_later_exactly_once(tmp_path, tracking_uri, caplog):
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.create_experiment(f"images-{tmp_path.name}", (tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    png = tmp_path / "run" / GRIDS_DIR / "step-000000003.png"
    png.parent.mkdir(parents=True)
    Image.new("RGB", (40, 20), (200, 30, 30)).save(png)
    path = tmp_path / "run" / JOURNAL_DIR / f"{run_id}.jsonl"
    journal = MetricJournal(path, run_id, DOWN)
    journal.log_metrics({"val/psnr": 20.0}, step=3)
    journal.log_image(png, GRID_KEY, step=3)
    assert journal.down_since is not None and [e["kind"] for e in journal.pending] == ["metrics", "image"]
    assert [e["kind"] for e in entries(path)] == ["metrics", "image"]  # on disk, not sent

    assert sync_journal(path, run_id, tracking_uri) == 2  # the server is back: `python -m vae.tracking` does this
    assert logged_image_steps(client, run_id, GRID_KEY) == [3]
    path.with_suffix(".sent").unlink()  # MLflow took them, but the acknowledgement was lost: all go again
    assert sync_journal(path, run_id, tracking_uri) == 2
    assert logged_image_steps(client, run_id, GRID_KEY) == [3]  # the same image is not logged twice
    assert [m.value for m in client.get_metric_history(run_id, "val/psnr")] == [20.0]

    later = MetricJournal(path, run_id, tracking_uri)  # a grid deleted before it was sent cannot hold back the rest
    png.unlink()
    later.log_image(png, GRID_KEY, step=6)
    later.log_metrics({"val/psnr": 21.0}, step=6)
    with caplog.at_level(logging.WARNING):
        assert later.flush(force=True)
    assert f"{png} no longer exists" in caplog.text
    assert [m.value for m in client.get_metric_history(run_id, "val/psnr")] == [20.0, 21.0]


def test_image_keys_are_fixed(tmp_path):
    journal = MetricJournal(tmp_path / "run.jsonl", "0" * 32, DOWN)
    with pytest.raises(ValueError, match="not among the fixed keys"):
        journal.log_image(tmp_path / "grid.png", "val/samples", step=1)
    assert not (tmp_path / "run.jsonl").exists()
