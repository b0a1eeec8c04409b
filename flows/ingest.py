"""Flow `ingest-dataset`: a source plugin's records -> a complete shard directory.

One task per split, fanned out on the flow's task runner (threads by default); `index.json` is written last,
by `pipeline.finalize_ingest`, once every split has landed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

import pipeline
from vae.config import IngestSection, RunConfig, SourceSection


@task(name="ingest-split", task_run_name="ingest-{split}", cache_policy=NO_CACHE)
def ingest_split(
    name: str, options: dict[str, Any], split: str, out_dir: Path, samples_per_shard: int, block_size: int
) -> tuple:
    """One split -> its tar shards; returns (split info, image shape) for `finalize_ingest`."""
    return pipeline.ingest_split(name, options, split, out_dir, samples_per_shard, block_size, progress=False)


DEFAULT_SOURCE, DEFAULT_INGEST = SourceSection(), IngestSection()  # pydantic models: never mutated in place


@flow(name="ingest-dataset")
def ingest_dataset(source: SourceSection = DEFAULT_SOURCE, ingest: IngestSection = DEFAULT_INGEST) -> str:
    """Ingest every split of `source` into `ingest.shard_dir` (reused when already complete); return its path."""
    logger = get_run_logger()
    out_dir = RunConfig(source=source, ingest=ingest).shard_dir.resolve()  # one place knows the default dir
    name, options = source.name, source.options
    if pipeline.prepare_dir(name, options, out_dir, ingest.overwrite) is not None:
        logger.info("%s is already complete for source %r; reusing it", out_dir, name)
        return str(out_dir)

    splits = pipeline.build_source(name, options).splits()
    futures = {
        split: ingest_split.submit(name, options, split, out_dir, ingest.samples_per_shard, ingest.block_size)
        for split in splits
    }
    results = {split: future.result() for split, future in futures.items()}
    index = pipeline.finalize_ingest(name, options, out_dir, ingest.block_size, results)
    counts = {split: info.num_samples for split, info in index.splits.items()}
    logger.info("wrote %s: %s samples per split, image shape %s", out_dir, counts, index.image_shape)
    return str(out_dir)
