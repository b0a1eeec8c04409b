"""The `ingest-dataset` flow fans out one task per shard group: on local threads, and on a Dask cluster."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from support.flow_runs import latest_task_run_names

import pipeline
from flows.ingest_dataset import ingest_dataset, task_runner
from vae.config import IngestSection, SourceSection


def test_flow_runs_one_task_per_shard_group(tmp_path, prefect_api, caplog):
    section = IngestSection(shard_dir=tmp_path / "shapes", samples_per_shard=64, block_size=16, workers=2)
    source = SourceSection(name="shapes", options={"train_samples": 300, "test_samples": 40, "size": 16})
    caplog.set_level(logging.WARNING)
    out = Path(ingest_dataset(source, section))
    # the subflow's group results were persisted with the cached task's plain-json serializer, which refused them
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    index = pipeline.read_index(out)
    assert [len(index.splits[s].shards) for s in ("train", "test")] == [5, 1]
    groups = sorted([f"ingest-train-{g}" for g in range(5)] + ["ingest-test-0"])
    assert latest_task_run_names("write-shard-groups") == groups
    images, labels = pipeline.read_split(out, "train")
    expected = list(pipeline.build_source(source.name, source.options).records("train"))
    np.testing.assert_array_equal(images, np.stack([r.image for r in expected]))


def test_flow_runs_on_a_dask_cluster(tmp_path, prefect_api):
    distributed = pytest.importorskip("distributed", reason="prefect-dask (a dependency) brings dask.distributed")
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None)
    with cluster:
        section = IngestSection(shard_dir=tmp_path / "digits", samples_per_shard=256, block_size=128,
                                dask_address=cluster.scheduler_address)
        assert type(task_runner(section)).__name__ == "DaskTaskRunner"
        out = Path(ingest_dataset(SourceSection(), section))
        with distributed.Client(cluster) as client:  # the tasks really ran on the cluster's workers
            ran = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    index = pipeline.read_index(out)
    assert len(index.splits["train"].shards) == 6 and index.splits["train"].num_samples == 1438
    assert any("ingest" in prefix for prefix in ran), ran
    images, _ = pipeline.read_split(out, "test")
    assert len(images) == 359


def _progress_artifacts(flow_name: str) -> list[float]:
    """The data of the progress artifacts of the latest run of the flow `flow_name`."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterType,
        FlowFilter,
        FlowFilterName,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        run = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                    sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]), type=ArtifactFilterType(any_=["progress"])))
    return [float(a.data) for a in artifacts]


def test_flow_holds_the_lock_and_reports_progress(tmp_path, prefect_api, monkeypatch, capsys):
    """Every group runs while the flow process holds the directory's lock; progress reaches 100 in the UI's
    artifact, and on a terminal a bar shows images/s."""
    import flows.ingest_dataset
    from pipeline.lock import LOCK_NAME, DirLock
    from pipeline.storage import Location

    out = tmp_path / "digits"
    holders = []
    write_group = pipeline.write_group

    def recording(plan, task, progress=False):
        holders.append(DirLock(Location(out)).holder())
        return write_group(plan, task, progress)

    monkeypatch.setattr(pipeline, "write_group", recording)
    monkeypatch.setattr(flows.ingest_dataset, "on_terminal", lambda: True)
    ingest_dataset(SourceSection(), IngestSection(shard_dir=out, samples_per_shard=512, block_size=128))
    assert len(holders) == 4 and {h["pid"] for h in holders} == {os.getpid()}
    assert not (out / LOCK_NAME).exists()
    assert _progress_artifacts("ingest-dataset") == [100.0]
    bar = capsys.readouterr().err
    assert "1797/1797" in bar and "img/s" in bar, bar


def test_flow_refuses_a_directory_another_ingest_holds(tmp_path, prefect_api):
    from pipeline.storage import Location

    out = tmp_path / "digits"
    with pipeline.DirLock(Location(out)), pytest.raises(pipeline.DirectoryLockedError, match="another ingest"):
        ingest_dataset(SourceSection(), IngestSection(shard_dir=out, samples_per_shard=512, block_size=128))
    assert not (out / pipeline.INDEX_NAME).exists()


PROCESS_RUNNER_SCRIPT = """
import json, sys
from flows.ingest_dataset import ingest_dataset
from vae.config import IngestSection, SourceSection
section = IngestSection(shard_dir=sys.argv[1], samples_per_shard=64, block_size=16, workers=1, runner="processes")
ingest_dataset(SourceSection(name="shapes", options={"train_samples": 128, "test_samples": 16, "size": 16}), section)
sys.path.insert(0, "tests")
from support.flow_runs import latest_task_run_names  # the temporary server lives only as long as this process
print(json.dumps(latest_task_run_names("write-shard-groups")))
"""


@pytest.mark.slow
def test_process_runner_workers_report_to_the_flows_temporary_server(tmp_path):
    """Without PREFECT_API_URL the flow talks to a temporary server, whose address is no setting; the process
    runner's workers get it through their environment and start none of their own (each worker started one
    before: 10-20 s apiece on this machine). Their task runs land on the flow's server."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180", PYTHONPATH=str(root))
    done = subprocess.run([sys.executable, "-c", PROCESS_RUNNER_SCRIPT, str(tmp_path / "shards")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == ["ingest-test-0", "ingest-train-0", "ingest-train-1"]
    assert done.stderr.count("Starting temporary server") == 1, done.stderr[-3000:]
