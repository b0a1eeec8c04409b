"""Flow `encode-latents`: a shard directory -> latent shards of a registered aekl model (or a diffusers folder),
then its MLflow run.

The flow loads the encoder once, runs one `encode-latent-group` task per group (each the images of one latent
shard; a group an earlier, interrupted run finished is kept), writes `index.json` last and records the run in
MLflow (experiment `encode-latents`). The groups run one after another in the flow's process: on one machine the
encoder uses every core (or the GPU) for each batch, so groups side by side would only contend. The work itself is
`vae.latents`; this file holds no ML logic.
"""

from __future__ import annotations

import os

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from vae.latents import EncodeJob, EncodeOptions, load_encoder
from vae.latents.encode import Group, GroupDone
from vae.latents.tracking import log_encode_run
from vae.tracking.store import embedded_uri


@task(name="encode-latent-group", task_run_name="encode-{group.split}-{group.group}", cache_policy=NO_CACHE)
def encode_latent_group(job: EncodeJob, group: Group) -> GroupDone:
    """One latent shard: its images encoded (or an intact earlier run's shard kept)."""
    return job.run(group)


@flow(name="encode-latents")
def encode_latents(model: str, shard_dir: str, out_dir: str, options: EncodeOptions | None = None,
                   tracking_uri: str | None = None, overwrite: bool = False, track: bool = True) -> dict:
    """Encode every image of `shard_dir` once with `model` (models:/NAME@ALIAS, models:/NAME/VERSION or a diffusers
    folder) into latent shards in `out_dir`; return index.json's content."""
    log = get_run_logger()
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or embedded_uri()
    job = EncodeJob.prepare(load_encoder(model, uri), shard_dir, out_dir, options, overwrite)
    groups = job.groups()
    kept = sum(encode_latent_group(job, group).reused for group in groups)
    index = job.finalize()
    log.info("encoded %d groups (%d kept from an earlier run) into %s", len(groups), kept, out_dir)
    if track:
        log.info("MLflow run %s at %s", log_encode_run(index, out_dir, uri), uri)
    return index.model_dump(mode="json")
