"""An encode as an MLflow run (experiment `encode-latents`): the model version it used, the source shards as its
input dataset, the latent shards as its output, and index.json as an artifact.

MLflow 3 has no dataset outputs (a run's outputs are models), so the latent shards are a dataset input with the
context `output`; the source shards have the context `source`. A registered model is linked by its logged
model's id (`LoggedModelInput`), so the version's page lists the encode among the runs that used it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pipeline
from pipeline.latents import LatentIndex
from pipeline.shards import INDEX_NAME
from pipeline.storage import Location
from vae.tracking.provenance import DIGEST_CHARS, dataset_source, model_inputs, source_tags
from vae.tracking.store import ensure_experiment

EXPERIMENT = "encode-latents"


def _dataset(location: str, name: str, digest: str, profile: dict):
    """An MLflow dataset entity for a directory, with a profile (MLflow reads none of its files)."""
    from mlflow.entities import Dataset

    source = dataset_source(location)
    return Dataset(name=name, digest=digest[:DIGEST_CHARS], source_type=source._get_source_type(),
                   source=source.to_json(), profile=json.dumps(profile))


def log_encode_run(index: LatentIndex, out_dir: str | Path, tracking_uri: str) -> str:
    """Record a finished encode as a run; return its id."""
    import mlflow
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    out = Location(out_dir)
    latent_sha = pipeline.index_sha256(out)
    model = index.model
    tags = {**source_tags(), "vaepipe.latents.index_sha256": latent_sha,
            "vaepipe.source.index_sha256": index.source["index_sha256"],
            **{f"vaepipe.model.{k}": str(v) for k, v in model.items()}}
    run = client.create_run(ensure_experiment(EXPERIMENT, tracking_uri), tags=tags,
                            run_name=f"encode-{model.get('name', Path(model.get('folder', 'model')).name)}")
    run_id = run.info.run_id
    counts = {split: info.num_samples for split, info in index.splits.items()}
    client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in {
        "dtype": index.dtype, "flip": index.flip, "latent_shape": list(index.latent_shape),
        "scaling_factor": index.scaling_factor, "shift_factor": index.shift_factor, "crop": index.transform["crop"],
        "precision": index.transform["precision"], "splits": counts}.items()])
    source = _dataset(str(index.source["shard_dir"]), "source-shards", index.source["index_sha256"],
                      {"index_sha256": index.source["index_sha256"], "layout": index.source["layout"]})
    latents = _dataset(out.url, "latent-shards", latent_sha,
                       {"index_sha256": latent_sha, "dtype": index.dtype, "latent_shape": list(index.latent_shape),
                        "num_samples": counts})
    client.log_inputs(run_id, datasets=[
        DatasetInput(source, [InputTag(MLFLOW_DATASET_CONTEXT, "source")]),
        DatasetInput(latents, [InputTag(MLFLOW_DATASET_CONTEXT, "output")])], models=model_inputs(client, model))
    client.log_text(run_id, out.read_text(INDEX_NAME), INDEX_NAME)
    client.set_terminated(run_id)
    return run_id

