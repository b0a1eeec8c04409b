"""Flow `ingest-dataset`: a source plugin's records -> a complete shard directory.

The flow plans the ingest (splits, image shape, layout, shard groups), fans out one `ingest-shard-group`
task per group through the subflow `write-shard-groups`, and writes `index.json` last, once every group has
landed. The subflow's task runner is chosen from the config: a Dask cluster (`prefect-dask`) when
`ingest.dask_address` names one, else a local thread or process pool of `pool_size` workers (default: the CPU
count), which bounds the groups written at once, and with them the threads and the memory. Groups finished by
an earlier, interrupted run are kept when their shards still match their checksums. The flow process holds the shard
directory's lock (`pipeline.DirLock`) from planning to `index.json`, wherever the group tasks run, so a second
ingest into the same directory refuses, naming the holder.

Progress: a Prefect progress artifact on the flow run (the UI shows it) goes from 0 to 100 as shard groups
land, weighted by their input counts; on a terminal a tqdm bar shows images/s and the ETA as well.

Faults: a failed group task is retried `ingest.retries` times with exponential back-off and jitter (a flaky
disk or object store); the retry rewrites only that group. Caching: the whole ingest is the task
`ingest-shards`, cached by Prefect under a key of the source config, the shard-shaping ingest options, the
location and the sha256 of the existing `index.json` (see `ShardDirCache`), so a re-run is a `Cached` task
and a changed, deleted or corrupt index, or a listed shard gone, is a miss. The cached result (the location) is
stored as plain JSON, and a record under the key that is anything else (a planted pickle) is never read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE, CachePolicy
from prefect.futures import as_completed
from prefect.results import get_result_store
from prefect.serializers import JSONSerializer
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff
from tqdm.auto import tqdm

import pipeline
from pipeline.storage import Location
from vae.config import IngestSection, RunConfig, SourceSection, load_config

RETRY_JITTER = 0.5  # each back-off delay is drawn from [d, 1.5 d]: retries of many groups do not hit a store at once
CACHE_KEY_VERSION = "vaepipe-shards-1"  # bump when what a cached location promises changes


# retries and back-off come from the config, through `with_retries`
@task(name="ingest-shard-group", task_run_name="ingest-{task.split}-{task.group}", cache_policy=NO_CACHE)
def ingest_shard_group(plan: pipeline.IngestPlan, task: pipeline.GroupTask) -> pipeline.GroupResult:
    """One shard group: its records -> its shards and completion marker (or the marker of an intact earlier run).

    A retry starts the group over: `write_group` removes the partial shards of its range first.
    """
    return pipeline.write_group(plan, task)


def with_retries(ingest: IngestSection):
    """`ingest_shard_group` with the config's retries and back-off (first delay ingest.retry_delay_s, doubling)."""
    return ingest_shard_group.with_options(
        retries=ingest.retries, retry_delay_seconds=exponential_backoff(ingest.retry_delay_s),
        retry_jitter_factor=RETRY_JITTER,
    )


def on_terminal() -> bool:
    """Whether to draw a progress bar: only for a person watching (not under a worker, a pipe or pytest)."""
    return sys.stdout.isatty()


class GroupProgress:
    """Shard groups landed, as the progress artifact `artifact_id` (0-100) and, on a terminal, a tqdm bar.

    A group weighs its input count, so the bar's rate is images/s; a source that cannot count its inputs
    (one group per split, or per part of it) weighs 1 per group.
    """

    def __init__(self, plan: pipeline.IngestPlan, artifact_id: UUID | None, loggers: list | None = None) -> None:
        counted = all(t.stop is not None for t in plan.groups)
        self.weight = {(t.split, t.group): t.stop - t.start if counted else 1 for t in plan.groups}
        self.total, self.done, self.artifact_id = sum(self.weight.values()), 0, artifact_id
        self.unit, self.loggers, self.logged = "images" if counted else "groups", loggers or [], 0.0
        self.bar = tqdm(total=self.total, unit="img" if counted else "group", desc=f"ingest {plan.out}",
                        disable=not on_terminal(), dynamic_ncols=True)

    def landed(self, result: pipeline.GroupResult) -> None:
        step = self.weight[(result.task.split, result.task.group)]
        self.done += step
        self.bar.update(step)
        percent = 100.0 * self.done / self.total
        if self.artifact_id is not None:
            update_progress_artifact(self.artifact_id, percent)
        if percent - self.logged >= PROGRESS_LOG_STEP or self.done == self.total:  # a line per 10%, not per group
            self.logged = percent
            say(self.loggers, logging.INFO, "ingest: %.0f%% (%d of %d %s)", percent, self.done, self.total, self.unit)

    def close(self) -> None:
        self.bar.close()


@flow(name="write-shard-groups")
def write_shard_groups(
    plan: pipeline.IngestPlan, ingest: IngestSection, progress_id: UUID | None = None
) -> list[pipeline.GroupResult]:
    """Submit every group of the plan to this flow's task runner; report each as it lands; return them in order."""
    group_task = with_retries(ingest)
    # A group needs the plan's settings, not its list of every group: Prefect walks each task's parameters and linked
    # every group to each landed group whose GroupTask (held by its result) that list holds, n^2 / 2 links for n
    # groups, sent to the API and held until the flow ends (266 groups: 1.5x the time, 3.4x the memory growth;
    # bench/LOG.md 2026-12-07); a process or Dask runner pickled the list once per group too. Prefect's `quote`
    # also stops the walk, but it is a tuple, and the Dask runner handed the task a plain tuple instead of the plan.
    settings = plan.model_copy(update={"groups": []})
    futures = [group_task.submit(settings, group) for group in plan.groups]
    progress = GroupProgress(plan, progress_id, watched_loggers())
    try:
        for future in as_completed(futures):
            progress.landed(future.result())
    finally:
        progress.close()
    return [future.result() for future in futures]


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (taskset, a container's cpuset), else os.cpu_count()."""
    if hasattr(os, "sched_getaffinity"):  # Linux
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# Prefect's setting for each local runner's pool (PREFECT_TASKS_RUNNER_<FIELD>), by ingest.runner
PREFECT_POOL_SETTING = {"threads": "thread_pool_max_workers", "processes": "process_pool_max_workers"}


def pool_size(ingest: IngestSection) -> tuple[int, str]:
    """Workers of the local pool, and where the number came from: `ingest.workers`; else Prefect's own setting for
    that runner's pool when the user set it (environment, profile or prefect.toml); else the CPU count.

    Never Prefect's default: for threads that is one thread per submitted task (max_workers None reads as
    sys.maxsize), so an ingest ran every shard group at once: 132 threads and 1.15 GB for 122 groups, load 98 at
    395 (bench/LOG.md 2026-12-07).
    """
    if ingest.workers is not None:
        return ingest.workers, "ingest.workers"
    from prefect.settings import get_current_settings

    runner_settings = get_current_settings().tasks.runner
    field = PREFECT_POOL_SETTING[ingest.runner]
    # pydantic-settings marks a field set when any source (environment, profile, toml) gave it a value
    if field in runner_settings.model_fields_set and getattr(runner_settings, field) is not None:
        return getattr(runner_settings, field), f"PREFECT_TASKS_RUNNER_{field.upper()}"
    return usable_cpus(), "the CPU count"


def task_runner(ingest: IngestSection) -> TaskRunner:
    """Dask when a scheduler address is configured, else the local pool the config asks for, of `pool_size`."""
    if ingest.dask_address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=ingest.dask_address)
    workers, _ = pool_size(ingest)
    if ingest.runner == "processes":
        return ProcessPoolTaskRunner(max_workers=workers)
    return ThreadPoolTaskRunner(max_workers=workers)


def runner_name(ingest: IngestSection, runner: TaskRunner) -> str:
    """The runner for the log: its class, and for a local pool its size and where the size came from."""
    if ingest.dask_address:
        return type(runner).__name__  # the cluster's workers are the cluster's business
    workers, origin = pool_size(ingest)
    return f"{type(runner).__name__} of {workers} worker(s) ({origin})"


@contextlib.contextmanager
def workers_share_this_api(runner: TaskRunner) -> Iterator[None]:
    """Process-pool workers report each task run to the Prefect API. Where no PREFECT_API_URL is set, this flow
    talks to a temporary server, whose address is no setting, so every worker process started a temporary server
    of its own (two per ingest on 2 workers, 10-20 s each on this machine: the process runner took 4.2x the
    thread runner's time on 1,024 photos, bench/LOG.md 2026-12-06). The workers inherit this process's
    environment (ProcessPoolTaskRunner passes os.environ), so the flow's own API address is put there while the
    groups run."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    if not isinstance(runner, ProcessPoolTaskRunner) or PREFECT_API_URL.value() or "PREFECT_API_URL" in os.environ:
        yield
        return
    with get_client(sync_client=True) as client:
        url = str(client.api_url)
    os.environ["PREFECT_API_URL"] = url
    try:
        yield
    finally:
        os.environ.pop("PREFECT_API_URL", None)


DEMO_PRESET = Path(__file__).resolve().parents[1] / "infra" / "configs" / "digits.yaml"  # what `vaepipe demo` trains


def demo_defaults() -> RunConfig:
    """The deployments' default parameters: the demo's preset, so that a deployment run without parameters trains
    the demo's model (30 epochs at batch 64, not the built-in 10 at 128) into the same experiment. The built-in
    defaults only where no checkout is at hand (an installed wheel carries no infra/)."""
    return load_config(DEMO_PRESET) if DEMO_PRESET.is_file() else RunConfig()


DEMO = demo_defaults()
DEFAULT_SOURCE, DEFAULT_INGEST = DEMO.source, DEMO.ingest  # pydantic models: never mutated in place
PROGRESS_LOG_STEP = 10.0  # percent between the progress lines logged to the watched flow run


def watched_loggers() -> list:
    """This flow run's logger, and the logger of the run `prefect deployment run --watch` follows when that is
    another (this flow runs as a subflow of train-vae): the watch streams the logs of its one flow run id only.
    The worker or runner names the run it started in PREFECT__FLOW_RUN_ID."""
    from prefect.logging.loggers import flow_run_logger
    from prefect.runtime import flow_run

    loggers = [get_run_logger()]
    watched = os.environ.get("PREFECT__FLOW_RUN_ID")
    if watched and watched != str(flow_run.id):
        loggers.append(flow_run_logger(flow_run_id=UUID(watched), flow_name="ingest-dataset"))
    return loggers


def say(loggers: list, level: int, message: str, *args: Any) -> None:
    for logger in loggers:
        logger.log(level, message, *args)


def _location(source: SourceSection, ingest: IngestSection) -> str:
    shard_dir = RunConfig(source=source, ingest=ingest).shard_dir  # one place knows the default dir
    return shard_dir if isinstance(shard_dir, str) else str(shard_dir.resolve())


def shard_dir_key(source: SourceSection, ingest: IngestSection, out: str) -> str | None:
    """The cache key of a complete shard directory, or None (no cache read, nothing recorded) when there is none.

    sha256 over: the key version, the source as index.json stores it, the ingest options that shape the shards
    (storage credentials left out), the location, and the bytes of the existing `index.json`. Missing, a
    deleted or unreadable index, a listed shard that is gone or of another size, and `ingest.overwrite`, all
    give None. Costs one read of index.json and one stat per shard, never a read of the shards.
    """
    if ingest.overwrite:
        return None
    location = Location(out, ingest.storage_options)
    try:
        index_sha256 = pipeline.index_sha256(location)
        index = pipeline.read_index(location)
        source_record = {"name": source.name, "config": pipeline.get_source_class(source.name).Config(
            **source.options).model_dump(mode="json")}
    except (OSError, ValueError):  # no index, unreadable or malformed (ShardFormatError is a ValueError)
        return None
    for split in index.splits.values():
        for shard in split.shards:
            if not location.isfile(shard.name) or location.size(shard.name) != shard.bytes:
                return None
    # the fields that shape the shards, and max_skip_fraction; storage_options (credentials) never. A field added to
    # SHARD_FIELDS (the held-out split's, max_pixels) changes every key once: the next run misses, finds the
    # directory complete and reuses it
    settings = ingest.model_dump(mode="json", include=pipeline.SHARD_FIELDS | {"max_skip_fraction"})
    data = {"version": CACHE_KEY_VERSION, "source": source_record, "options": settings, "location": str(location),
            "index_sha256": index_sha256}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


# The one serializer `ingest-shards` records its result with: plain json, no object hooks. Prefect loads a record
# with the serializer the record itself names, so a planted record naming pickle (or a json "jsonlib" of pickle)
# would run code on a cache hit; `ShardDirCache` reads only records that name exactly this.
RESULT_SERIALIZER = JSONSerializer(object_encoder=None, object_decoder=None)


def stored_record_is_plain_json(store: Any, key: str) -> bool:
    """Whether the record under `key` in the task's result store is absent, or a plain-json string result."""
    try:
        raw = store.result_storage.read_path(key)
    except (OSError, ValueError):  # LocalFileSystem raises ValueError for a missing path: nothing to read
        return True
    if not isinstance(raw, bytes):  # an async-only storage block: cannot be checked here, so not trusted
        if hasattr(raw, "close"):
            raw.close()
        return False
    try:
        record = json.loads(raw)
        serializer = record["metadata"]["serializer"]
        return serializer == RESULT_SERIALIZER.model_dump(mode="json") and isinstance(json.loads(record["result"]), str)
    except (ValueError, KeyError, TypeError):
        return False


@dataclass
class ShardDirCache(CachePolicy):
    """Prefect cache policy of `ingest-shards`: `shard_dir_key` of its inputs (source, ingest, out), or no cache
    (None) when a record stored under that key was not written by us as plain json."""

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        key = shard_dir_key(inputs["source"], inputs["ingest"], inputs["out"])
        if key is not None and not stored_record_is_plain_json(task_ctx.result_store, key):
            get_run_logger().warning("ignoring the cached result %s: it is not a plain-json record written by "
                                     "vaepipe, and loading it could run code; the ingest runs instead", key)
            return None
        return key


def remember(source: SourceSection, ingest: IngestSection, out: str) -> None:
    """Record `out` in the task's result store under the key the next run will compute.

    Prefect computes a task's cache key before the task runs, when a fresh ingest has no index yet; without
    this the first re-run would miss and only the second would hit.
    """
    key = shard_dir_key(source, ingest.model_copy(update={"overwrite": False}), out)
    if key is not None:
        store = get_result_store()
        store.persist_result_record(store.create_result_record(out, key=key))


@task(name="ingest-shards", cache_policy=ShardDirCache(), persist_result=True, result_serializer=RESULT_SERIALIZER)
def ingest_shards(source: SourceSection, ingest: IngestSection, out: str) -> str:
    """Plan, write every shard group, write index.json last; a complete directory of this source is kept.

    Holds the directory's lock throughout (this process; group tasks may run elsewhere).
    """
    with pipeline.DirLock(Location(out, ingest.storage_options)):
        return _ingest_locked(source, ingest, out)


def _ingest_locked(source: SourceSection, ingest: IngestSection, out: str) -> str:
    loggers = watched_loggers()  # what the ingest does reaches `--watch` of a train-vae run too (a subflow)
    name, options = source.name, source.options
    progress_id = create_progress_artifact(0.0, description=f"shard groups of {name} written to {out}")
    if pipeline.prepare_dir(name, options, out, ingest.overwrite, ingest.storage_options) is not None:
        say(loggers, logging.INFO, "%s is already complete for source %r; reusing it", out, name)
        update_progress_artifact(progress_id, 100.0)
        remember(source, ingest, out)
        return out
    plan = pipeline.plan_ingest(name, options, out, ingest)
    for warning in plan.warnings:
        say(loggers, logging.WARNING, warning)
    runner = task_runner(ingest)
    say(loggers, logging.INFO, "ingest: %d shard group(s) of %s into %s, layout %s, image shape %s, on %s",
        len(plan.groups), name, out, plan.shard.layout, plan.shard.image_shape, runner_name(ingest, runner))
    with workers_share_this_api(runner):
        # Prefect persists a subflow's result when the task around it persists its own (`ingest-shards`, cached),
        # whatever the subflow says, and with that task's plain-json serializer, which refuses the GroupResult
        # models: a WARNING on every ingest. Prefect's own json serializer writes them (a record never read back:
        # the subflow has no cache policy).
        results = write_shard_groups.with_options(task_runner=runner, result_serializer="json")(plan, ingest,
                                                                                              progress_id)
    index = pipeline.finalize_ingest(plan, results)
    kept = sum(r.reused for r in results)
    counts = {split: info.num_samples for split, info in index.splits.items()}
    say(loggers, logging.INFO, "wrote %s: %s samples per split, image shape %s; %d of %d groups kept from an "
        "earlier run", out, counts, index.image_shape, kept, len(results))
    if index.skipped:
        say(loggers, logging.WARNING, "skipped %s input(s), each listed with its reason in %s/%s", index.skipped, out,
                       pipeline.REPORT_NAME)
    remember(source, ingest, out)
    return out


@flow(name="ingest-dataset")
def ingest_dataset(source: SourceSection = DEFAULT_SOURCE, ingest: IngestSection = DEFAULT_INGEST) -> str:
    """Ingest every split of `source` into `ingest.shard_dir` (reused when already complete); return its location."""
    return ingest_shards(source, ingest, _location(source, ingest))
