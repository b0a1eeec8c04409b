"""What a run was made from, in the fields MLflow's own UI shows (mlflow is imported inside the functions that
call it: a second to import, rank 0 only): datasets, source tags, system metrics, and the
model version's description. (The logged model's metrics are MLflow's own link: the model is logged at the
checkpoint's step, and MLflow attaches the run's metrics of that step, the final evaluation, to it. A system
metric joins them only where the monitor has taken as many samples as training took steps: steps of 10 s or more.)

- Datasets: one `mlflow.data` dataset per split used (training, validation), named `<source>-<split>`, whose
  digest is the shard directory's index.json sha256 (cut to the 32 hex digits MLflow's store holds; the full
  hash is in the profile and the version tag `shard_index_sha256`), whose source is the shard directory and whose
  profile holds the sample count and image shape. The run page lists them under Datasets.
- Source tags: the standard `mlflow.user`, `mlflow.source.name`, `mlflow.source.type` (what MLflow's fluent
  `start_run` sets through its context registry, used here too) and `mlflow.source.git.commit` (this checkout's
  commit, only where it is known); the flow adds `prefect.flow_run.id` and `prefect.flow_run.url`.
- System metrics: MLflow's own `SystemMetricsMonitor` (CPU, memory, disk, network; GPU utilisation and memory
  when `nvidia-ml-py` is installed, the `gpu` extra), on rank 0 only.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import warnings
from pathlib import Path
from typing import Any

import pipeline
from vae.config import RunConfig

DIGEST_CHARS = 32  # MLflow's store keeps a dataset digest of at most 36 characters (MAX_DATASET_DIGEST_SIZE)
FLOW_RUN_ID_TAG, FLOW_RUN_URL_TAG = "prefect.flow_run.id", "prefect.flow_run.url"
SOURCE_TAGS = ("mlflow.user", "mlflow.source.name", "mlflow.source.type", "mlflow.source.git.commit")
STOP_MONITOR_S = 10.0  # how long the end of training waits for the monitor's last upload
REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout, when vaepipe runs from one
log = logging.getLogger(__name__)


def shard_datasets(cfg: RunConfig) -> dict[str, Any]:
    """{context: dataset} for the training and validation splits of `cfg.shard_dir` ("training", "validation")."""
    return {context: split_dataset(cfg.shard_dir, split, cfg.ingest.storage_options)
            for context, split in (("training", cfg.data.train_split), ("validation", cfg.data.val_split))}


def split_dataset(shard_dir: str | os.PathLike, split: str, storage_options: dict | None = None):
    """One split of a shard directory as an MLflow dataset: named `<source>-<split>`, its digest the index's
    sha256, its profile the split's counts and image shape (MLflow reads none of the files)."""
    from mlflow.data.meta_dataset import MetaDataset

    class ShardDataset(MetaDataset):
        """A MetaDataset with a profile (MetaDataset has none): the split's counts and image shape."""

        def __init__(self, source, name: str, digest: str, profile: dict) -> None:
            self._profile = profile
            super().__init__(source=source, name=name, digest=digest)

        @property
        def profile(self) -> dict:
            return self._profile

        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "profile": json.dumps(self._profile)}

    index = pipeline.read_index(shard_dir, storage_options)
    sha = pipeline.index_sha256(shard_dir, storage_options)
    info = index.split(split)
    profile = {"split": split, "num_samples": info.num_samples, "num_shards": len(info.shards),
               "image_shape_hwc": list(index.image_shape), "dtype": index.dtype, "layout": index.layout,
               "num_classes": info.num_classes, "shard_index_sha256": sha}
    return ShardDataset(dataset_source(str(shard_dir)), f"{index.source['name']}-{split}", sha[:DIGEST_CHARS],
                        profile)


def dataset_source(location: str):
    """A directory as an MLflow dataset source, of the kind its URL names (a local path, s3://, ...)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    with warnings.catch_warnings():
        # MLflow 3.17 registers its local-file source twice (for "" and "file:") and warns that a path is ambiguous
        # between the two, which are the same class
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        return resolve_dataset_source(location)


def model_inputs(client, provenance: dict[str, Any]) -> list:
    """A registered version's logged model as a run's model input (`provenance` {'name', 'version', ...} of
    vae.registry.store.diffusers_source), so the version's page lists the run; [] for a folder, or a version
    whose store keeps no logged model."""
    from mlflow.entities import LoggedModelInput

    if "name" not in provenance:
        return []
    model_id = client.get_model_version(provenance["name"], str(provenance["version"])).model_id
    return [LoggedModelInput(model_id)] if model_id else []


def source_tags() -> dict[str, str]:
    """The tags MLflow's fluent `start_run` sets (user; source name and type: this process's argv[0], LOCAL),
    with this checkout's commit where it is known."""
    from mlflow.tracking.context.registry import resolve_tags

    tags = {k: v for k, v in resolve_tags().items() if k in SOURCE_TAGS}
    commit = git_commit()
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    return tags


def git_commit(root: Path = REPO_ROOT) -> str:
    """The commit checked out at `root`, or 'unknown' where that is no git checkout (an installed wheel, a
    copied tree, no git): provenance is worth a tag, never a failed registration."""
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True,
                             text=True, timeout=30, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    # Inside some other checkout (a virtualenv in a project's tree), git answers with that project's commit.
    if len(out) != 2 or Path(out[0]).resolve() != Path(root).resolve():
        return "unknown"
    return out[1]


def log_datasets(client, run_id: str, cfg: RunConfig) -> None:
    """Log the training and validation splits as the run's dataset inputs (idempotent: MLflow keeps one input
    per dataset and run, so a resumed run logs nothing twice)."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    inputs = [DatasetInput(dataset._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, context)])
              for context, dataset in shard_datasets(cfg).items()]
    client.log_inputs(run_id, datasets=inputs)


def start_system_metrics(run_id: str, uri: str):
    """MLflow's system-metrics monitor for `run_id`, started (rank 0 only: one machine's figures per run). Its
    sampling follows MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL (default 10 s). It stops by itself when the run is
    no longer RUNNING or the server stops answering; such gaps are not resent (the journal holds training's own
    metrics, not these)."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, tracking_uri=uri, resume_logging=True)
    monitor.start()
    return monitor


def stop_system_metrics(monitor, wait_s: float = STOP_MONITOR_S) -> None:
    """Stop the monitor and upload its last samples, waiting at most `wait_s`: its thread may be inside a
    request to a server that does not answer (MLflow's retries take minutes), which must not hold up training's
    exit. The thread is a daemon, so one still waiting dies with the process."""
    stopper = threading.Thread(target=monitor.finish, daemon=True, name="stop-system-metrics")
    stopper.start()
    stopper.join(wait_s)
    if stopper.is_alive():
        log.warning("system metrics: the last samples were not uploaded within %.0f s; left behind", wait_s)


def model_description(details: dict, metrics: dict[str, float], tags: dict[str, str], data: str) -> str:
    """The registered version's description (markdown): architecture, data, headline figures."""
    spec = details["model_spec"]
    c, h, w = spec["image_shape"]
    options = ", ".join(f"{k}={v}" for k, v in sorted(spec.get("options", {}).items())) or "defaults"
    headline = ("val/nll_iwae", "val/elbo", "val/bpd", "val/psnr", "val/ssim", "val/lpips", "val/scaling_factor")
    figures = ", ".join(f"{k} {metrics[k]:.4f}" for k in headline if k in metrics)
    bound = f" (IWAE k={details['iwae_k']})" if "iwae_k" in details else ""  # the ELBO family's NLL estimate
    return (f"{spec['arch']} VAE, latent dim {spec['latent_dim']}, input {c}x{h}x{w} ({options}).\n\n"
            f"Data: {data} (shard index sha256 {tags.get('shard_index_sha256', '?')}).\n\n"
            f"Validation{bound}: {figures or 'not finite'} "
            f"at step {details.get('global_step')}.\n\nCommit {tags.get('git_commit', 'unknown')}.")
