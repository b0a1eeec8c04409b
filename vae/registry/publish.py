"""Publishing a finished run: what training left in its output directory (the newest checkpoint, evaluation.json,
metrics.json, the plots) logged into its MLflow run and registered as a new version of the model.

`publish_run` is the journal's publisher (vae/tracking/journal.py) and the flow's publish task. It needs only
the output directory and the tracking server, not the data or the devices. Registering twice from one run is
refused, so a retried publish registers nothing twice.
"""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import numpy as np
from mlflow.entities import Param, RunTag

from vae.config import RunConfig, load_config
from vae.objectives import CRITERIA, NLL
from vae.objectives.aekl.protocol import DIGEST_TAG, EvaluationProtocol
from vae.registry.packaging import log_model
from vae.registry.versions import CHAMPION, RegisteredVersion, register_version
from vae.tracking import provenance
from vae.tracking.store import resolve_uri
from vae.training.finalize import DETAILS_FILE, EXAMPLE_FILE, PLOTS_DIR, load_evaluation
from vae.training.trained import load_trained


def log_artifacts(run_dir: Path, run_id: str) -> None:
    """The plots and evaluation.json, as artifacts of run `run_id`."""
    client = mlflow.MlflowClient()
    for f in sorted((run_dir / PLOTS_DIR).glob("*.png")):
        client.log_artifact(run_id, str(f), artifact_path=PLOTS_DIR)
    client.log_artifact(run_id, str(run_dir / DETAILS_FILE))


def register_run(cfg: RunConfig, run_id: str, metrics: dict[str, float] | None = None,
                 uri: str | None = None) -> RegisteredVersion:
    """Log the trained model (newest checkpoint, EMA weights when kept) to `run_id` as a pyfunc and register it
    with the tags saved by `save_evaluation`; `challenger` goes to the new version, `champion` only if it is the
    best under the objective's criterion (validation NLL; aekl: PSNR), neither if that is not finite. A version
    this run registered already is returned as it is (a retried publish registers nothing twice). Needs only
    output_dir and the tracking server."""
    run_dir = Path(cfg.train.output_dir)
    saved, details = load_evaluation(run_dir)
    metrics = metrics or saved
    mlflow.set_tracking_uri(uri or resolve_uri(cfg))
    name = details["model_name"]
    client = mlflow.MlflowClient()
    done = [v for v in client.search_model_versions(f"run_id='{run_id}'") if v.name == name]
    if done:
        version = done[0]
        print(f"run {run_id} registered {name} version {version.version} already; nothing to do", flush=True)
        describe(client, cfg, name, version.version, metrics, details)  # a retry after a failure in between
        return RegisteredVersion(name, int(version.version), f"models:/{name}/{version.version}",
                                 CHAMPION in (version.aliases or []), None)
    model, _ = load_trained(run_dir)  # rebuilt from its meta.json: no shard index, no storage options needed
    example = np.load(run_dir / EXAMPLE_FILE, allow_pickle=False)
    log_artifacts(run_dir, run_id)
    if "protocol" in details:  # aekl: the evaluation protocol as the run's params, its digest as a tag
        protocol = EvaluationProtocol.model_validate(details["protocol"])
        client.log_batch(run_id, params=[Param(k, v) for k, v in protocol.params().items()],
                         tags=[RunTag(DIGEST_TAG, protocol.digest())])
    run_tags = client.get_run(run_id).data.tags
    # at the checkpoint's step: MLflow then links the final evaluation (logged at that step) to the logged model
    model_uri = log_model(model.eval(), details["model_spec"], run_id, input_example=example,
                          tags={k: v for k, v in run_tags.items() if k in provenance.SOURCE_TAGS},
                          step=details["global_step"])
    champion = CRITERIA[details.get("champion", NLL.tag)]  # older evaluations: the NLL
    reason = details["nonfinite"].get(champion.metric)
    version = register_version(model_uri, name, metrics.get(champion.metric, math.nan), run_id,
                               tags=details["tags"], nonfinite_reason=reason, criterion=champion)
    describe(client, cfg, name, version.version, metrics, details)
    return version


def describe(client, cfg: RunConfig, name: str, version: int | str, metrics: dict[str, float], details: dict) -> None:
    """Give the model version its description (architecture, data, headline figures) unless it has one."""
    if not client.get_model_version(name, str(version)).description:
        data = f"{cfg.source.name} shards at {cfg.shard_dir}"
        client.update_model_version(name, str(version),
                                    description=provenance.model_description(details, metrics, details["tags"], data))


def publish_run(output_dir: str | Path, run_id: str, uri: str) -> RegisteredVersion:
    """Register what a finished training run left in `output_dir` into run `run_id` at `uri`: the journal's
    publisher, called at the end of training or later from `python -m vae.tracking`."""
    output_dir = Path(output_dir).resolve()
    cfg = load_config(output_dir / "config.yaml")
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"output_dir": output_dir})})
    version = register_run(cfg, run_id, uri=uri)
    print(f"registered {version.uri} (champion: {version.champion})", flush=True)
    return version
