"""Ingestion: a source's records -> a complete shard directory.

The steps are separate functions so that a Prefect flow can fan them out as tasks (`ingest_split` per
split, then `finalize_ingest` once); `ingest` composes them for plain, in-process use.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from pipeline import shards
from pipeline.errors import ShardFormatError
from pipeline.shards import INDEX_NAME, ShardIndex, SplitInfo, read_index
from pipeline.sources import build_source, validate_options

SplitResult = tuple[SplitInfo, tuple[int, int, int]]


def is_complete(shard_dir: str | os.PathLike) -> bool:
    """True when the directory holds a readable `index.json` (the completion marker)."""
    try:
        read_index(shard_dir)
    except ShardFormatError:
        return False
    return True


def source_record(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The source as `index.json` stores it: name and the validated, JSON-safe config."""
    return {"name": name, "config": validate_options(name, options).model_dump(mode="json")}


def ingest_split(
    name: str, options: dict[str, Any], split: str, out_dir: Path, samples_per_shard: int, block_size: int,
    progress: bool = True,
) -> SplitResult:
    """Write one split of source `name` into `out_dir`."""
    source = build_source(name, options)
    records = tqdm(source.records(split), desc=f"ingest {name}/{split}", unit="img", disable=not progress)
    return shards.write_split(records, Path(out_dir), split, samples_per_shard, block_size)


def finalize_ingest(
    name: str, options: dict[str, Any], out_dir: Path, block_size: int, results: dict[str, SplitResult]
) -> ShardIndex:
    """Check the splits agree on the image shape, then write `index.json` last."""
    image_shapes = {split: shape for split, (_, shape) in results.items()}
    if len(set(image_shapes.values())) != 1:
        raise ShardFormatError(f"splits disagree on the image shape: {image_shapes}; packed shards need one size")
    index = ShardIndex(
        source=source_record(name, options),
        block_size=block_size,
        image_shape=next(iter(image_shapes.values())),
        splits={split: info for split, (info, _) in results.items()},
    )
    shards.write_index(Path(out_dir), index)
    return index


def prepare_dir(name: str, options: dict[str, Any], out_dir: Path, overwrite: bool) -> ShardIndex | None:
    """Return the existing index when `out_dir` is already complete for this source, else make it ready.

    A complete directory written from a different source config is never silently reused or overwritten.
    """
    out_dir = Path(out_dir)
    if is_complete(out_dir):
        index = read_index(out_dir)
        if not overwrite:
            if index.source != source_record(name, options):
                raise ShardFormatError(
                    f"{out_dir} already holds shards of {index.source}, not of source {name!r} with {options}; "
                    "choose another ingest.shard_dir or set ingest.overwrite=true"
                )
            return index
        (out_dir / INDEX_NAME).unlink()  # from here on the directory reads as incomplete until rewritten
    out_dir.mkdir(parents=True, exist_ok=True)
    return None


def ingest(
    name: str,
    options: dict[str, Any] | None,
    out_dir: str | os.PathLike,
    samples_per_shard: int = 8192,
    block_size: int = 1024,
    overwrite: bool = False,
    progress: bool = True,
) -> ShardIndex:
    """Ingest every split of source `name` into `out_dir`; reuse the directory when it is already complete."""
    options = options or {}
    out_dir = Path(out_dir)
    existing = prepare_dir(name, options, out_dir, overwrite)
    if existing is not None:
        return existing
    splits = build_source(name, options).splits()
    results = {s: ingest_split(name, options, s, out_dir, samples_per_shard, block_size, progress) for s in splits}
    return finalize_ingest(name, options, out_dir, block_size, results)
