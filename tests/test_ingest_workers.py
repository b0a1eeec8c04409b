"""The ingest's local pool: at most `ingest.workers` shard groups at once, by default the CPU count, and Prefect's
own pool setting when the user set it. Concurrency is counted, never timed."""

from __future__ import annotations

import logging
import threading

import pytest
from prefect.settings import (
    PREFECT_TASKS_RUNNER_PROCESS_POOL_MAX_WORKERS,
    PREFECT_TASKS_RUNNER_THREAD_POOL_MAX_WORKERS,
    temporary_settings,
)

import flows.ingest_dataset
import pipeline
from flows.ingest_dataset import ingest_dataset, pool_size, usable_cpus
from vae.config import IngestSection, SourceSection

GUARD_S = 300  # a group waiting this long means the flow stopped submitting: fail instead of hanging the suite
# 40 shard groups of 16 tiny sprites each (32 train, 8 test)
MANY_GROUPS = SourceSection(name="shapes", options={"train_samples": 512, "test_samples": 128, "size": 16})


class GroupsAtOnce:
    """`pipeline.write_group` counting the groups inside it at once (`peak`) and the threads that ran them.

    Each group waits on entry until the flow has submitted every group (the flow then waits on them with
    `as_completed`). Meanwhile no pool thread comes free, so a pool with room starts a thread per submitted group:
    an unbounded pool has the groups in at once, a bounded one at most its size.
    """

    def __init__(self, write_group, as_completed) -> None:
        self._write_group, self._as_completed = write_group, as_completed
        self._cond = threading.Condition()
        self._submitted = False
        self.active = self.peak = 0
        self.threads: set[int] = set()

    def as_completed(self, futures):
        with self._cond:
            self._submitted = True
            self._cond.notify_all()
        return self._as_completed(futures)

    def write_group(self, plan, task, progress=False):
        with self._cond:
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.threads.add(threading.get_ident())
            if not self._cond.wait_for(lambda: self._submitted, timeout=GUARD_S):
                raise RuntimeError("the flow never finished submitting its shard groups")
        try:
            return self._write_group(plan, task, progress)
        finally:
            with self._cond:
                self.active -= 1


@pytest.fixture
def counted(monkeypatch) -> GroupsAtOnce:
    counter = GroupsAtOnce(pipeline.write_group, flows.ingest_dataset.as_completed)
    monkeypatch.setattr(pipeline, "write_group", counter.write_group)
    monkeypatch.setattr(flows.ingest_dataset, "as_completed", counter.as_completed)
    return counter


def _ingest(tmp_path, caplog, **ingest) -> tuple[int, str]:
    """Ingest MANY_GROUPS in groups of 16; the number of shard groups written, and the flow's line naming its runner."""
    section = IngestSection(shard_dir=tmp_path / "shapes", samples_per_shard=16, block_size=16, **ingest)
    caplog.set_level(logging.INFO)
    ingest_dataset(MANY_GROUPS, section)
    index = pipeline.read_index(tmp_path / "shapes")
    runner = [r.getMessage() for r in caplog.records if "shard group(s) of shapes" in r.getMessage()]
    return sum(len(split.shards) for split in index.splits.values()), runner[-1]


def test_an_ingest_runs_at_most_ingest_workers_groups_at_once(tmp_path, prefect_api, counted, caplog):
    """A number the user sets is kept, even above the CPU count."""
    workers = usable_cpus() + 1
    groups, runner = _ingest(tmp_path, caplog, workers=workers)
    assert groups == 40
    assert counted.peak <= workers and len(counted.threads) <= workers, (counted.peak, len(counted.threads))
    assert runner.endswith(f"on ThreadPoolTaskRunner of {workers} worker(s) (ingest.workers)"), runner


def test_the_default_pool_is_the_cpu_count(tmp_path, prefect_api, counted, caplog):
    """Prefect's own default for the thread pool is a thread per submitted task: 40 groups ran at once here."""
    groups, runner = _ingest(tmp_path, caplog)
    assert groups == 40
    cpus = usable_cpus()
    assert counted.peak <= cpus and len(counted.threads) <= cpus, (counted.peak, len(counted.threads))
    assert runner.endswith(f"on ThreadPoolTaskRunner of {cpus} worker(s) (the CPU count)"), runner


def test_prefects_thread_pool_setting_is_honoured_when_set(tmp_path, prefect_api, counted, caplog):
    with temporary_settings(updates={PREFECT_TASKS_RUNNER_THREAD_POOL_MAX_WORKERS: 1}):
        groups, runner = _ingest(tmp_path, caplog)
    assert groups == 40
    assert counted.peak == 1 and len(counted.threads) == 1, (counted.peak, len(counted.threads))
    assert runner.endswith("of 1 worker(s) (PREFECT_TASKS_RUNNER_THREAD_POOL_MAX_WORKERS)"), runner


@pytest.mark.parametrize("runner", ["threads", "processes"])
def test_pool_size_takes_ingest_workers_then_prefects_setting_then_the_cpu_count(runner):
    setting = {"threads": PREFECT_TASKS_RUNNER_THREAD_POOL_MAX_WORKERS,
               "processes": PREFECT_TASKS_RUNNER_PROCESS_POOL_MAX_WORKERS}[runner]
    name = setting.name
    with temporary_settings(restore_defaults={setting}):  # unset, whatever this shell says
        assert pool_size(IngestSection(runner=runner)) == (usable_cpus(), "the CPU count")
        assert pool_size(IngestSection(runner=runner, workers=5)) == (5, "ingest.workers")
    with temporary_settings(updates={setting: 7}):
        assert pool_size(IngestSection(runner=runner)) == (7, name)
        assert pool_size(IngestSection(runner=runner, workers=5)) == (5, "ingest.workers")
    other = {"threads": "processes", "processes": "threads"}[runner]  # the other runner's setting is not ours
    with temporary_settings(updates={setting: 7}):
        assert pool_size(IngestSection(runner=other)) != (7, name)


def _group_task_inputs() -> list[int]:
    """Per group task run of the latest `write-shard-groups` run: how many upstream runs Prefect linked to it."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        run = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["write-shard-groups"])),
                                    sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    return [sum(len(inputs) for inputs in t.task_inputs.values()) for t in tasks]


def test_a_group_task_is_linked_to_no_earlier_group(tmp_path, prefect_api, caplog):
    """A landed group's result holds its GroupTask, and every group task was given the whole plan, which lists them
    all: Prefect's dependency tracking linked each group to every group landed before it (n^2 / 2 links, sent to
    the API and held in memory: 266 groups of shapes took 1.5x the time and 3.4x the memory growth)."""
    groups, _ = _ingest(tmp_path, caplog, workers=1)  # one at a time: every earlier group has landed
    assert groups == 40
    assert _group_task_inputs() == [0] * 40
