"""Where runs are tracked: the embedded sqlite default, attaching to the store, creating a run with its provenance
and params, and logging metrics directly (the flow's figures; training goes through the journal).

Values are logged as Python floats: MLflow (and Accelerate's tracker on top of it) silently drops tensors. mlflow
is imported inside the functions that call it: it takes about a second to import, and rank 0 alone needs it.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from pipeline import ShardFormatError
from vae.config import RunConfig, flatten
from vae.tracking import provenance
from vae.tracking.metrics import checked

EMBEDDED_DB = "mlflow.db"
EMBEDDED_ARTIFACTS = "mlartifacts"

log = logging.getLogger(__name__)


def embedded_uri(base: str | os.PathLike | None = None) -> str:
    """Absolute sqlite URI under `base` (default: the working directory); MLflow 3 refuses the old file store."""
    return f"sqlite:///{(Path(base or Path.cwd()) / EMBEDDED_DB).resolve()}"


def resolve_uri(cfg: RunConfig | None = None) -> str:
    """The config's URI, else MLFLOW_TRACKING_URI, else the embedded sqlite store."""
    if cfg is not None and cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    return os.environ.get("MLFLOW_TRACKING_URI") or embedded_uri()


def configure(cfg: RunConfig | None = None) -> str:
    """Point this process's MLflow client at the resolved store; return the URI."""
    import mlflow

    uri = resolve_uri(cfg)
    mlflow.set_tracking_uri(uri)
    return uri


def ensure_experiment(name: str, uri: str) -> str:
    """Experiment id for `name`, creating it; with a sqlite store its artifacts go beside the database."""
    import mlflow

    existing = mlflow.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / EMBEDDED_ARTIFACTS).resolve().as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


def create_run(cfg: RunConfig, tags: dict[str, str] | None = None) -> str:
    """Create a run for `cfg` with its provenance (vae/tracking/provenance.py: MLflow's source tags, this checkout's
    commit, then `tags`, which may replace them; the training and validation datasets) and params; return the
    run id (the flow hands it to training).

    Created through the client, not the fluent `mlflow.start_run`: the run outlives this call (the journal,
    another process) and the fluent API ends a run it started when the process exits."""
    import mlflow

    uri = configure(cfg)
    client = mlflow.MlflowClient(uri)
    run = client.create_run(ensure_experiment(cfg.tracking.experiment, uri), run_name=cfg.tracking.run_name,
                            tags={**provenance.source_tags(), **(tags or {})})
    log_params(client, run.info.run_id, cfg)
    try:
        provenance.log_datasets(client, run.info.run_id, cfg)
    except ShardFormatError as err:  # lineage is worth a warning, never a failed run (the loader says more)
        log.warning("run %s has no dataset lineage: %s", run.info.run_id, err)
    return run.info.run_id


def log_params(client, run_id: str, cfg: RunConfig) -> None:
    """The resolved config as params; MlflowClient.log_batch splits them into requests of at most 100 itself."""
    from mlflow.entities import Param

    client.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in flatten(cfg).items()])  # MLflow's value limit


def log_metrics(metrics: dict[str, float], step: int, run_id: str | None = None) -> None:
    """Log floats under the fixed names; an unknown name is a programming error, caught here."""
    import mlflow

    values = checked(metrics)
    if run_id is None:
        mlflow.log_metrics(values, step=step)
    else:
        mlflow.MlflowClient().log_batch(
            run_id, metrics=[_metric(k, v, step) for k, v in values.items()]
        )


def _metric(key: str, value: float, step: int):
    from mlflow.entities import Metric

    return Metric(key, value, int(time.time() * 1000), step)
