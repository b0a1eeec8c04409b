"""A model's evaluation as an MLflow run (experiment `evaluate-vae`): the protocol's fields as params
(`protocol.<field>`), its digest as the tag `eval_protocol_sha256`, the numbers as `eval/<metric>`, the protocol as
`protocol.json`, the evaluated split as a dataset input (context `evaluation`) and a registered version as a model
input, so the version's page lists the evaluations that scored it."""

from __future__ import annotations

import os
import time
from pathlib import Path

from vae.objectives.aekl.protocol import DIGEST_TAG, EvaluationProtocol
from vae.tracking.metrics import finite
from vae.tracking.provenance import model_inputs, source_tags, split_dataset
from vae.tracking.store import ensure_experiment

EXPERIMENT = "evaluate-vae"


def log_evaluation_run(ref: str, provenance: dict, protocol: EvaluationProtocol, metrics: dict[str, float],
                       shard_dir: str | os.PathLike, tracking_uri: str) -> str:
    """Record one model's evaluation as a finished run; return its id."""
    import mlflow  # ~1.4 s; imported by the function that talks to the server, as vae.latents.tracking does
    from mlflow.entities import DatasetInput, InputTag, Metric, Param
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    mlflow.set_tracking_uri(tracking_uri)  # ensure_experiment uses the fluent API
    client = mlflow.MlflowClient(tracking_uri)
    tags = {**source_tags(), DIGEST_TAG: protocol.digest(), "vaepipe.evaluate.model": ref,
            **{f"vaepipe.model.{k}": str(v) for k, v in provenance.items()}}
    label = provenance.get("name", Path(provenance.get("folder", "model")).name)
    run = client.create_run(ensure_experiment(EXPERIMENT, tracking_uri), tags=tags, run_name=f"evaluate-{label}")
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(f"eval/{k}", v, now, 0) for k, v in finite(metrics).items()],
                     params=[Param(k, v) for k, v in protocol.params().items()])
    dataset = split_dataset(shard_dir, protocol.split)._to_mlflow_entity()
    client.log_inputs(run_id, datasets=[DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, "evaluation")])],
                      models=model_inputs(client, provenance))
    client.log_dict(run_id, protocol.model_dump(mode="json"), "protocol.json")
    client.set_terminated(run_id)
    return run_id
