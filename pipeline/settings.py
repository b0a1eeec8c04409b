"""The settings of an ingest as users write them: the `source` and `ingest` sections of a run config.

One schema: the run config (`vae.config.RunConfig`) composes these sections, the ingest flow takes them as
parameters, and `pipeline.ingestion` reads its settings from an `IngestSection`. Every field is documented here, and
a bad value raises naming the field. This module imports neither torch nor numpy.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.conform import DEFAULT_MAX_PIXELS
from pipeline.sources import validate_options
from pipeline.storage import is_url


class Section(BaseModel):
    """Base of a config section: unknown fields are an error, and an assignment is validated like the input."""

    # allow_inf_nan=False: a float field refuses inf and nan ("Input should be a finite number"); pydantic
    # accepts both by default, and an infinite lr or beta trains nothing but NaNs.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def check_finite(value: Any, path: str) -> Any:
    """Refuse inf and nan anywhere in free-form data (plugin options, fsspec options), naming the key."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{path} must be a finite number, got {value}")
    if isinstance(value, dict):
        for key, item in value.items():
            check_finite(item, f"{path}.{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            check_finite(item, f"{path}[{i}]")
    return value


class SourceSection(Section):
    name: str = Field("digits", description="Source plugin (entry point in group 'vaepipe.sources').")
    options: dict[str, Any] = Field(default_factory=dict, description="The plugin's own config fields.")

    @field_validator("options")
    @classmethod
    def _finite_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        return check_finite(options, "source.options")

    @model_validator(mode="after")
    def _check_plugin(self) -> SourceSection:
        # the registry lookup: an unknown name lists the valid ones
        validate_options(self.name, self.options, complete=False)  # required ones are the ingest's to check
        return self

class IngestSection(Section):
    shard_dir: Path | str | None = Field(
        None, description="Where shards go: a local path or an fsspec URL (s3://bucket/prefix); "
        "default data/shards/<source name>."
    )
    samples_per_shard: int = Field(8192, gt=0, description="Images per tar shard (a multiple of block_size, packed).")
    shard_bytes: int = Field(
        256 << 20, gt=0, description="Largest shard in bytes: samples_per_shard is lowered to stay under it (from "
        "the stored size of the first images, for encoded photos)."
    )
    block_size: int = Field(1024, gt=0, description="Images packed into one tar member (packed); the most "
                            "encoded images in one block (encoded-blocks, which holds about 1 MB per block).")
    overwrite: bool = Field(False, description="Re-ingest even when a complete shard directory exists.")
    layout: Literal["auto", "packed", "encoded", "encoded-blocks"] = Field(
        "auto", description="packed: blocks of images per tar member; encoded: one PNG/JPEG per sample; "
        "encoded-blocks: blocks of encoded images (~1 MB) per tar sample, ~1% tar framing instead of ~28% at "
        "256 px; auto: packed up to 16 kB per image (64x64x3), encoded-blocks above."
    )
    image_format: Literal["jpeg", "png", "webp"] = Field(
        "jpeg", description="Encoding of images the encoded layout has to encode (resized, cropped or converted "
        "ones); an image that needs no change keeps its source bytes (JPEG, PNG or WebP) untouched. png: lossless."
    )
    quality: int = Field(95, ge=1, le=100, description="JPEG/WebP quality of encoded images.")
    shards_per_task: int = Field(1, gt=0, description="Shards written by one ingest task (a shard group).")
    on_error: Literal["skip", "fail"] = Field(
        "skip", description="Unusable inputs (corrupt, unreadable, rejected by the rules below): skip and list "
        "them in skipped.jsonl, or stop the ingest."
    )
    size_rule: Literal["reject", "resize", "crop"] = Field(
        "reject", description="Images of another size than the dataset's: reject, resize (stretch), or crop "
        "(scale the shorter side, centre-crop)."
    )
    channel_rule: Literal["reject", "convert"] = Field(
        "reject", description="Images with another channel count (L/RGB/RGBA): reject, or convert."
    )
    image_size: tuple[int, int] | None = Field(
        None, description="Target (H, W); default: the most common size among the inputs (imagefolder reads every "
        "file's header to find it; other sources: the first image's)."
    )
    channels: Literal[1, 3, 4] | None = Field(
        None, description="Target channels; default: the most common channel count (as image_size)."
    )
    max_pixels: int = Field(
        DEFAULT_MAX_PIXELS, gt=0, description="Largest image read, in pixels (W x H); default Pillow's limit "
        f"(Image.MAX_IMAGE_PIXELS, {DEFAULT_MAX_PIXELS:,}). A larger image is refused from its header, before "
        "decoding, as an unusable input ('oversized', under ingest.on_error): a 30000x30000 PNG is 874 kB on disk and "
        "2.7 GB decoded. Above Pillow's limit, the ingest raises Pillow's to this."
    )
    test_fraction: float = Field(
        0.0, ge=0, lt=1, description="Share of a collection that arrives as one split (img2dataset shards, an arrays "
        "file, an hf dataset with only train) held out as a validation split 'test'; each input goes by a seeded hash "
        "of its key, so a re-ingest keeps every key in its split whatever the order. 0: none. A source with "
        "several splits is left as it is unless ingest.test_from names one."
    )
    test_from: str | None = Field(
        None, description="The split ingest.test_fraction holds 'test' out of; default: the source's only split."
    )
    test_seed: int = Field(0, description="Seed of the held-out assignment (ingest.test_fraction).")
    max_skip_fraction: float = Field(
        0.01, ge=0, le=1, description="The ingest fails, naming the reasons and skipped.jsonl, when more than this "
        "fraction of the inputs was skipped; with size_rule reject and mixed sizes it refuses before writing."
    )
    runner: Literal["threads", "processes"] = Field(
        "threads", description="Local task runner of the ingest flow (processes: true parallelism, slower start)."
    )
    workers: int | None = Field(
        None, gt=0, description="Local workers, the shard groups written at once; default: Prefect's "
        "PREFECT_TASKS_RUNNER_THREAD_POOL_MAX_WORKERS (PROCESS_POOL with processes) when set, else the CPU count."
    )
    dask_address: str | None = Field(
        None, description="Dask scheduler address (tcp://host:8786): run the shard groups on that cluster."
    )
    retries: int = Field(3, ge=0, description="Retries of a failed shard-group task (a flaky disk, network or store).")
    retry_delay_s: float = Field(
        2.0, ge=0, description="First retry delay in seconds; doubled per retry, with jitter (Prefect's back-off)."
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for a URL shard_dir (e.g. {endpoint_url: ...} for S3)."
    )

    @field_validator("storage_options")
    @classmethod
    def _finite_storage_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        return check_finite(options, "ingest.storage_options")

    @model_validator(mode="before")
    @classmethod
    def _path_or_url(cls, data: Any) -> Any:
        """shard_dir: a URL stays a string (Path would fold its '//'); anything else is a local Path."""
        value = data.get("shard_dir") if isinstance(data, dict) else None
        if value is not None and not isinstance(value, Path) and not is_url(value):
            data = {**data, "shard_dir": Path(value)}
        return data

    # samples_per_shard must be a multiple of block_size only for packed shards, which the layout decides once the
    # image size is known: the ingest's plan checks it (pipeline.ingestion.plan), before any shard is written


# The ingest settings a shard group's files are a function of: a finished group is kept by a re-run only when they
# are unchanged (`pipeline.ingestion.group`). The other fields say where the shards go (shard_dir, storage_options),
# whether to start over (overwrite), when to give up (max_skip_fraction), and how the flow schedules the groups.
SHARD_FIELDS = frozenset({
    "samples_per_shard", "shard_bytes", "block_size", "layout", "image_format", "quality", "shards_per_task",
    "on_error", "size_rule", "channel_rule", "image_size", "channels", "test_fraction", "test_from", "test_seed",
    "max_pixels",
})
