"""Orchestration under faults: flaky ingest reads, cached re-runs, a SIGKILLed training rank, a Prefect server
restart in the middle of a flow run, and the report artifact of a resumed run.

The flaky ingest reads come from the test source `flaky` (tests/support/flaky_source.py), registered in-process (and
in the flow subprocess) by adding an entry point to the source registry.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import REPO, stop
from support.flaky_source import register_flaky_source
from support.flow_runs import task_runs
from support.servers import PrefectServer

import pipeline
from flows.ingest_dataset import ingest_dataset, shard_dir_key
from pipeline.ingestion import MARKERS
from pipeline.sources import available_sources
from pipeline.sources.digits import DigitsConfig, DigitsSource
from vae.config import IngestSection, SourceSection

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def flaky_source():
    registry = available_sources()
    register_flaky_source()
    yield
    registry.pop("flaky", None)


def ingest_state(source: SourceSection, section: IngestSection):
    """Run the ingest flow; return (its final state, the state of its `ingest-shards` task run)."""
    state = ingest_dataset(source, section, return_state=True)
    [shards_task] = task_runs(state.state_details.flow_run_id, "ingest-shards")
    return state, shards_task.state


# ---- 1. retries with back-off


def test_flaky_group_reads_are_retried_into_a_complete_shard_dir(tmp_path, prefect_api, flaky_source):
    state_dir = tmp_path / "attempts"
    source = SourceSection(name="flaky", options={"state_dir": str(state_dir)})
    section = IngestSection(shard_dir=tmp_path / "shards", samples_per_shard=256, block_size=128, workers=2,
                            retries=2, retry_delay_s=0.1)
    state = ingest_dataset(source, section, return_state=True)
    assert state.is_completed(), state
    out = Path(state.result())

    index = pipeline.read_index(out)
    assert pipeline.verify(out) == []  # every shard matches its checksum: no half-written leftovers
    expected = DigitsSource(DigitsConfig())
    for split in ("train", "test"):
        images, labels = pipeline.read_split(out, split)
        records = list(expected.records(split))
        np.testing.assert_array_equal(images, np.stack([r.image for r in records]))
        assert labels.tolist() == [r.label for r in records]
    groups = len(index.splits["train"].shards) + len(index.splits["test"].shards)
    assert groups == 8  # 1438 train and 359 test images, 256 per shard, one shard per group

    attempts = {p.name: len(p.read_text().splitlines()) for p in state_dir.iterdir()}
    assert len(attempts) == groups and set(attempts.values()) == {2}, attempts  # each failed once, then passed
    runs = task_runs(state.state_details.flow_run_id, "ingest-")
    group_runs = [r for r in runs if not r.name.startswith("ingest-shards")]
    assert len(group_runs) == groups
    assert {r.run_count for r in group_runs} == {2} and {r.state.name for r in group_runs} == {"Completed"}


def test_a_group_that_keeps_failing_fails_the_ingest_after_its_retries(tmp_path, prefect_api, flaky_source):
    """No retry budget: the transient error surfaces, and the directory is left incomplete (no index)."""
    source = SourceSection(name="flaky", options={"state_dir": str(tmp_path / "attempts")})
    section = IngestSection(shard_dir=tmp_path / "shards", samples_per_shard=1024, block_size=128, retries=0)
    with pytest.raises(OSError, match="transient read error"):
        ingest_dataset(source, section)
    assert not pipeline.is_complete(tmp_path / "shards")


# ---- 2. caching keyed on the source config and the index checksum


def test_a_rerun_is_served_from_the_cache_until_the_source_or_the_index_changes(tmp_path, prefect_api, prefect_home):
    out = tmp_path / "digits"
    section = IngestSection(shard_dir=out, samples_per_shard=512, block_size=128)
    source = SourceSection()
    state, task_state = ingest_state(source, section)
    assert task_state.name == "Completed"
    stamp = (out / pipeline.INDEX_NAME).stat().st_mtime_ns
    key = shard_dir_key(source, section, str(out.resolve()))
    assert key is not None and (prefect_home / "storage" / key).is_file()  # the result store is under PREFECT_HOME

    state, task_state = ingest_state(source, section)  # same config, same index: a cache hit
    assert task_state.name == "Cached" and state.result() == str(out.resolve())
    assert (out / pipeline.INDEX_NAME).stat().st_mtime_ns == stamp

    # Other source options, same directory: the cache misses, and the ingest refuses to mix the two.
    changed = SourceSection(options={"test_fraction": 0.3})
    assert shard_dir_key(changed, section, str(out.resolve())) not in (None, key)
    with pytest.raises(pipeline.ShardFormatError, match="overwrite"):
        ingest_dataset(changed, section)
    state, task_state = ingest_state(changed, section.model_copy(update={"overwrite": True}))
    assert task_state.name == "Completed"
    index = pipeline.read_index(out)
    assert index.source["config"]["test_fraction"] == 0.3 and index.splits["test"].num_samples == 539
    state, task_state = ingest_state(changed, section)  # and that re-ingest is cached in its turn
    assert task_state.name == "Cached"

    (out / pipeline.INDEX_NAME).unlink()  # a deleted index never hits: the directory is ingested again
    assert shard_dir_key(changed, section, str(out.resolve())) is None
    state, task_state = ingest_state(changed, section)
    assert task_state.name == "Completed" and pipeline.is_complete(out)
    assert pipeline.read_index(out).splits["test"].num_samples == 539


class Planted:
    """Pickled into a planted cache record: loading it touches a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_the_cached_result_is_plain_json_and_a_planted_pickle_is_never_loaded(tmp_path, prefect_api, prefect_home):
    """The ingest cache record was a cloudpickle, unpickled on every hit; Prefect loads a record with the serializer
    the record names, so a planted one naming pickle must not be read at all."""
    from prefect.results import ResultRecord, ResultRecordMetadata
    from prefect.serializers import PickleSerializer

    out = tmp_path / "digits"
    section = IngestSection(shard_dir=out, samples_per_shard=512, block_size=128)
    ingest_state(SourceSection(), section)
    key = shard_dir_key(SourceSection(), section, str(out.resolve()))
    stored = prefect_home / "storage" / key
    record = json.loads(stored.read_bytes())
    assert record["metadata"]["serializer"]["type"] == "json"
    assert json.loads(record["result"]) == str(out.resolve())  # the location, as JSON text
    state, task_state = ingest_state(SourceSection(), section)
    assert task_state.name == "Cached" and state.result() == str(out.resolve())

    marker = tmp_path / "pwned"
    planted = ResultRecord(metadata=ResultRecordMetadata(serializer=PickleSerializer(), storage_key=key),
                           result=Planted(marker))
    stored.write_bytes(planted.serialize())
    state, task_state = ingest_state(SourceSection(), section)
    assert not marker.exists()
    assert task_state.name == "Completed" and state.result() == str(out.resolve())  # ingest ran, reused the dir
    assert json.loads(stored.read_bytes())["metadata"]["serializer"]["type"] == "json"  # and recorded it anew


def test_the_cache_key_follows_the_index_bytes_and_the_shards_on_disk(tmp_path, digits_shards):
    source = SourceSection()
    section = IngestSection(shard_dir=tmp_path / "copy", samples_per_shard=512, block_size=128)
    out = shutil.copytree(digits_shards, tmp_path / "copy")
    key = shard_dir_key(source, section, str(out))
    assert key is not None and key == shard_dir_key(source, section, str(out))  # stable
    assert shard_dir_key(SourceSection(options={"seed": 1}), section, str(out)) != key
    assert shard_dir_key(source, section.model_copy(update={"overwrite": True}), str(out)) is None

    index = out / pipeline.INDEX_NAME
    original = index.read_text()
    index.write_text(original.replace('"created": "', '"created": "1'))  # same content, other bytes
    assert shard_dir_key(source, section, str(out)) not in (None, key)
    index.write_text(original[: len(original) // 2])  # truncated: unreadable
    assert shard_dir_key(source, section, str(out)) is None
    index.write_text(original)
    assert shard_dir_key(source, section, str(out)) == key
    next(out.glob("train-*.tar")).unlink()  # a listed shard gone: never a hit
    assert shard_dir_key(source, section, str(out)) is None


# ---- 3. a SIGKILLed rank: the flow's retry resumes from the last checkpoint, in the same MLflow run


def _training_ranks(marker: str) -> list[psutil.Process]:
    """The rank processes (not their parents, `accelerate launch` and vae.launch) of the training whose command line
    names `marker`."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        line = " ".join(proc.info["cmdline"] or [])
        if (proc.info["status"] != psutil.STATUS_ZOMBIE and marker in line and "vae/train.py" in line
                and "accelerate.commands.launch" not in line and "vae.launch" not in line):
            found.append(proc)
    return found


class RankKiller(threading.Thread):
    """SIGKILLs the training rank once the first epoch's checkpoint is complete (its meta.json exists)."""

    def __init__(self, runs: Path, timeout: float = 400) -> None:
        super().__init__(daemon=True)
        self.runs, self.timeout, self.killed, self.at_epoch = runs, timeout, [], None
        self.done = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        while not self.done.is_set() and time.monotonic() < deadline:
            metas = sorted(self.runs.glob("*/checkpoints/step-*/meta.json"))
            if metas:
                ranks = _training_ranks(str(self.runs))
                self.at_epoch = json.loads(metas[0].read_text())["epoch"]
                for proc in ranks:
                    proc.send_signal(signal.SIGKILL)
                    self.killed.append(proc.pid)
                if ranks:
                    return
            time.sleep(0.05)


def _flush_prefect_logs() -> None:
    """Send the log records still queued in this process to the API (they travel in the background)."""
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)


@pytest.mark.slow
def test_a_sigkilled_rank_is_resumed_by_the_flow_retry_and_the_report_shows_samples(
    tmp_path, prefect_api, monkeypatch
):
    import mlflow
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterTaskRunId

    from flows.train_vae import train_vae
    from vae.config import load_config
    from vae.training.checkpoint import latest, read_meta

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = tmp_path / "runs"
    epochs = 3
    config = load_config(REPO / "infra/configs/digits.yaml", [
        "--ingest.shard_dir", str(tmp_path / "shards"), "--train.output_dir", str(runs),
        "--train.epochs", str(epochs), "--train.batch_size", "32", "--train.retries", "1",
        "--tracking.tracking_uri", uri, "--tracking.model_name", "vae-faults", "--tracking.experiment", "faults",
        "--loss.eval_iwae_k", "2",
    ])
    killer = RankKiller(runs)
    killer.start()
    try:
        state = train_vae(config, return_state=True)
    finally:
        killer.done.set()
        killer.join(timeout=10)
        for proc in _training_ranks(str(runs)):
            proc.kill()
    assert killer.killed, "the watcher never found the training rank to kill"
    assert killer.at_epoch == 1
    assert state.is_completed(), state
    result = state.result()

    flow_run_id = state.state_details.flow_run_id
    [train] = task_runs(flow_run_id, "train")
    assert train.run_count == 2 and train.state.name == "Completed"  # killed once, retried once
    _flush_prefect_logs()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[train.id])))
    messages = "\n".join(log.message for log in logs)
    assert "attempt 2: resuming from" in messages and "resuming from" in messages.split("attempt 2:")[1]

    [output_dir] = [p for p in runs.iterdir() if p.is_dir()]
    final = read_meta(latest(output_dir))
    assert final["epoch"] == epochs and final["reason"] == "end of epoch"
    assert final["mlflow_run_id"] == result["run_id"]  # the resumed child logged into the flow's run

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("faults")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [result["run_id"]]
    assert client.get_run(result["run_id"]).info.status == "FINISHED"
    val_steps = {m.step for m in client.get_metric_history(result["run_id"], "val/elbo")}
    assert len(val_steps) == epochs  # one validation per epoch across both attempts, none repeated
    assert result["version"] >= 1
    assert client.get_model_version("vae-faults", str(result["version"])).run_id == result["run_id"]

    # 5. the report artifact: the run link and the sample grid, inline and in MLflow
    with get_client(sync_client=True) as prefect_client:
        artifacts = prefect_client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    [report] = [a for a in artifacts if a.key == "train-vae-report"]
    assert f"run `{result['run_id']}` in `{uri}`" in report.data
    assert f"runs:/{result['run_id']}/plots/samples.png" in report.data
    encoded = report.data.split("](data:image/png;base64,", 1)[1].split(")", 1)[0]
    png = base64.b64decode(encoded, validate=True)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) <= 200_000
    assert png == (output_dir / "plots" / "samples.png").read_bytes()  # small enough to go in unchanged


FAKE_CHILD = """
import json, pathlib, sys
out, args = pathlib.Path(sys.argv[1]), sys.argv[2:]
(out / "argv.log").open("a").write(" ".join(args) + "\\n")
if sys.argv[-1] == "refuse":
    print("vae.trainer.TrainingError: expected 2 processes but the launcher started 1")
    sys.exit(1)
if "--train.resume" in args:
    print("resuming from the preempted checkpoint")
    sys.exit(0)
step = out / "checkpoints" / "step-000000007"
step.mkdir(parents=True)
(step / "meta.json").write_text(json.dumps({"epoch": 0, "global_step": 7, "reason": "preempted"}))
print("preempted: wrote", step)
sys.exit(75)  # what vae.launch makes of a launch whose ranks all checkpointed on preemption
"""


@pytest.mark.parametrize("child", ["preempted", "refuse"])
def test_a_preempted_launch_is_retried_with_resume_and_a_refusal_is_not(
    tmp_path, prefect_api, monkeypatch, caplog, child
):
    """The launch task against a stand-in for vae.launch: a preempted child (exit 75, checkpoint reason 'preempted')
    is retried with --train.resume true; a child that stopped on its own TrainingError is not."""
    from prefect.settings import PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW, temporary_settings

    import flows.train_vae
    from vae.config import RunConfig

    def fake_command(config_path, num_processes, accelerate_config, overrides):
        return [sys.executable, "-c", FAKE_CHILD, str(Path(config_path).parent), *overrides, child], {}

    monkeypatch.setattr(flows.train_vae, "accelerate_command", fake_command)
    config = RunConfig(train={"output_dir": tmp_path / "run"}, tracking={"tracking_uri": "sqlite:////nowhere.db"})
    launch = flows.train_vae.launch_training.with_options(retries=2, retry_delay_seconds=0)
    with temporary_settings(updates={PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW: "ignore"}):  # a task without a flow
        state = launch(config, "run-id-1", return_state=True)
    attempts = (tmp_path / "run" / "argv.log").read_text().splitlines()
    if child == "preempted":
        assert state.is_completed(), state
        assert len(attempts) == 2 and "--train.resume true" not in attempts[0]
        assert "--train.resume true" in attempts[1]
        assert "exited with 75 (preempted, checkpoint" in caplog.text  # recognised as a preemption, not a crash
    else:
        assert state.is_failed() and len(attempts) == 1  # not retried: a retry would repeat the refusal
        with pytest.raises(flows.train_vae.TrainingFailed, match="TrainingError, not retried"):
            state.result()


# ---- 4. the Prefect server restarts in the middle of a flow run


@pytest.mark.server
@pytest.mark.slow
def test_a_flow_run_survives_a_prefect_server_restart(tmp_path, prefect_home):
    """The API goes away while the group tasks run. The train split's groups finish during the outage (their
    completion markers written, the flow process alive and waiting on the API); the server comes back on the same
    port and database, and only then is the test split's group let go. The run completes on the restarted server:
    it ends after an object the test created there, both times stamped by that server."""
    from prefect import get_client
    from prefect.client.schemas.actions import VariableCreate
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    gates = {"train": tmp_path / "release-train", "test": tmp_path / "release-test"}
    options = {"state_dir": str(tmp_path / "attempts"), "fail_first": False,
               "wait_for": {split: str(path) for split, path in gates.items()}}
    run_name = "restart-survivor"
    script = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); from support.flaky_source import run_gated_ingest; "
              f"run_gated_ingest({options!r}, {str(tmp_path / 'shards')!r}, {run_name!r})")
    server = PrefectServer(tmp_path / "server")
    flow_env = {**os.environ, "PREFECT_API_URL": server.api, "PREFECT_HOME": str(tmp_path / "client-home")}
    flow_log = tmp_path / "flow.log"
    flow_proc = None

    def wait_until(done, what: str, timeout: float = 180) -> None:
        """Poll `done` while the flow runs; fail when the flow process ends first or after `timeout` s."""
        deadline = time.monotonic() + timeout
        while not done():
            assert flow_proc.poll() is None, f"the flow run ended while waiting for {what}:\n{flow_log.read_text()}"
            assert time.monotonic() < deadline, f"waited {timeout} s for {what}:\n{flow_log.read_text()}"
            time.sleep(0.2)

    server.start()
    try:
        with open(flow_log, "w") as f:
            flow_proc = subprocess.Popen([sys.executable, "-c", script], env=flow_env, cwd=tmp_path, stdout=f,
                                         stderr=subprocess.STDOUT)
        wait_until(lambda: list((tmp_path / "attempts").glob("attempts-*")), "the flow run's group tasks")

        server.stop()  # the API goes away while tasks are running (the port refuses connections) ...
        gates["train"].touch()  # ... and the train groups finish and report during the outage
        markers = tmp_path / "shards" / MARKERS
        wait_until(lambda: len(list(markers.glob("train-*.json"))) == 3,  # 1438 images, 512 per group
                   "the train groups to finish during the outage")
        assert not pipeline.is_complete(tmp_path / "shards")  # the test group is still held
        server.start()  # same port, same database
        with temporary_settings(updates={PREFECT_API_URL: server.api}), get_client(sync_client=True) as client:
            restarted = client.create_variable(VariableCreate(name="restarted", value="yes"))
        gates["test"].touch()  # the run can end only from here on

        assert flow_proc.wait(timeout=300) == 0, flow_log.read_text()
        with temporary_settings(updates={PREFECT_API_URL: server.api}), get_client(sync_client=True) as client:
            [run] = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[run_name])))
            assert run.state.type.value == "COMPLETED", run.state
            assert run.end_time > restarted.created  # it reported its end to the restarted server
            groups = task_runs(run.id, "ingest-")
        assert len(groups) == 1 + 4 and {t.state.type.value for t in groups} == {"COMPLETED"}, groups
        assert pipeline.is_complete(tmp_path / "shards")
    finally:
        if flow_proc is not None:
            stop(flow_proc)
        server.stop()
