"""Flow `ingest-dataset`: a source plugin's records -> a complete shard directory.

The flow plans the ingest (splits, image shape, layout, shard groups), fans out one `ingest-shard-group`
task per group through the subflow `write-shard-groups`, and writes `index.json` last, once every group has
landed. The subflow's task runner is chosen from the config: a Dask cluster (`prefect-dask`) when
`ingest.dask_address` names one, else a local thread or process pool. Groups finished by an earlier,
interrupted run are kept when their shards still match their checksums.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

import pipeline
from vae.config import IngestSection, RunConfig, SourceSection


@task(name="ingest-shard-group", task_run_name="ingest-{task.split}-{task.group}", cache_policy=NO_CACHE)
def ingest_shard_group(plan: pipeline.IngestPlan, task: pipeline.GroupTask) -> pipeline.GroupResult:
    """One shard group: its records -> its shards and completion marker (or the marker of an intact earlier run)."""
    return pipeline.write_group(plan, task)


@flow(name="write-shard-groups")
def write_shard_groups(plan: pipeline.IngestPlan) -> list[pipeline.GroupResult]:
    """Submit every group of the plan to this flow's task runner and wait for all of them."""
    futures = [ingest_shard_group.submit(plan, group) for group in plan.groups]
    return [future.result() for future in futures]


def task_runner(ingest: IngestSection) -> TaskRunner:
    """Dask when a scheduler address is configured, else the local pool the config asks for."""
    if ingest.dask_address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=ingest.dask_address)
    if ingest.runner == "processes":
        return ProcessPoolTaskRunner(max_workers=ingest.workers)
    return ThreadPoolTaskRunner(max_workers=ingest.workers)


DEFAULT_SOURCE, DEFAULT_INGEST = SourceSection(), IngestSection()  # pydantic models: never mutated in place


def _location(source: SourceSection, ingest: IngestSection) -> str:
    shard_dir = RunConfig(source=source, ingest=ingest).shard_dir  # one place knows the default dir
    return shard_dir if isinstance(shard_dir, str) else str(shard_dir.resolve())


@flow(name="ingest-dataset")
def ingest_dataset(source: SourceSection = DEFAULT_SOURCE, ingest: IngestSection = DEFAULT_INGEST) -> str:
    """Ingest every split of `source` into `ingest.shard_dir` (reused when already complete); return its location."""
    logger = get_run_logger()
    out = _location(source, ingest)
    name, options = source.name, source.options
    if pipeline.prepare_dir(name, options, out, ingest.overwrite, ingest.storage_options) is not None:
        logger.info("%s is already complete for source %r; reusing it", out, name)
        return out
    opts = pipeline.IngestOptions(**ingest.model_dump(include=set(pipeline.IngestOptions.model_fields)))
    plan = pipeline.plan_ingest(name, options, out, opts)
    runner = task_runner(ingest)
    logger.info("%d shard group(s) of %s, layout %s, image shape %s, on %s", len(plan.groups), name,
                plan.shard.layout, plan.shard.image_shape, type(runner).__name__)
    results = write_shard_groups.with_options(task_runner=runner)(plan)
    index = pipeline.finalize_ingest(plan, results)
    kept = sum(r.reused for r in results)
    counts = {split: info.num_samples for split, info in index.splits.items()}
    logger.info("wrote %s: %s samples per split, image shape %s; %d of %d groups kept from an earlier run",
                out, counts, index.image_shape, kept, len(results))
    if index.skipped:
        logger.warning("skipped %s input(s), each listed with its reason in %s/%s", index.skipped, out,
                       pipeline.REPORT_NAME)
    return out
