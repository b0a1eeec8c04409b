"""MLflow plumbing: the embedded default store, attaching to a run, and the fixed metric names.

Only rank 0 calls into this module. Values are logged as Python floats: MLflow (and Accelerate's tracker
on top of it) silently drops tensors.
"""

from __future__ import annotations

import os
from pathlib import Path

from vae.config import RunConfig, flatten

EMBEDDED_DB = "mlflow.db"
EMBEDDED_ARTIFACTS = "mlartifacts"

# The fixed, slash-separated metric names (DESIGN.md). Anything logged goes through one of these.
METRICS = (
    "train/loss", "train/elbo", "train/recon", "train/kl", "train/lr", "train/grad_norm", "train/samples_per_s",
    "train/skipped_steps",
    "val/elbo", "val/recon", "val/kl", "val/nll_iwae", "val/bpd", "val/active_units", "val/recon_mse",
)


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


def create_run(cfg: RunConfig) -> str:
    """Create a run for `cfg`, log its params, and return the run id (the flow hands it to training)."""
    import mlflow

    uri = configure(cfg)
    client = mlflow.MlflowClient(uri)
    run = client.create_run(ensure_experiment(cfg.tracking.experiment, uri), run_name=cfg.tracking.run_name)
    log_params(client, run.info.run_id, cfg)
    return run.info.run_id


def log_params(client, run_id: str, cfg: RunConfig) -> None:
    from mlflow.entities import Param

    params = [Param(k, v[:6000]) for k, v in flatten(cfg).items()]
    for i in range(0, len(params), 100):  # the REST API takes at most 100 params per batch
        client.log_batch(run_id, params=params[i : i + 100])


def start_or_resume(cfg: RunConfig, run_id: str | None = None):
    """Activate the run to log into: `run_id` (a resumed run), else MLFLOW_RUN_ID (set by the flow), else new."""
    import mlflow

    uri = configure(cfg)
    run_id = run_id or os.environ.get("MLFLOW_RUN_ID")
    if run_id:
        return mlflow.start_run(run_id=run_id)
    run = mlflow.start_run(
        experiment_id=ensure_experiment(cfg.tracking.experiment, uri), run_name=cfg.tracking.run_name
    )
    log_params(mlflow.MlflowClient(uri), run.info.run_id, cfg)
    return run


def log_metrics(metrics: dict[str, float], step: int, run_id: str | None = None) -> None:
    """Log floats under the fixed names; an unknown name is a programming error, caught here."""
    import mlflow

    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"metric names {sorted(unknown)} are not among the fixed names {METRICS}")
    values = {k: float(v) for k, v in metrics.items()}
    if run_id is None:
        mlflow.log_metrics(values, step=step)
    else:
        mlflow.MlflowClient().log_batch(
            run_id, metrics=[_metric(k, v, step) for k, v in values.items()]
        )


def _metric(key: str, value: float, step: int):
    import time

    from mlflow.entities import Metric

    return Metric(key, value, int(time.time() * 1000), step)


def end_run(status: str) -> None:
    """End the active run with `status` (FINISHED, or KILLED when preempted: a resume reopens it)."""
    import mlflow

    mlflow.end_run(status=status)
