"""After training: the one post-training path, for `vae/train.py` and the Prefect flow alike.

`finish` (called by the trainer at the end of every run, whoever launched it):
1. the objective's `final_evaluation` (vae/objective.py; every rank, on its device): each rank evaluates its exact
   slice of the validation split (the loader's pad=False slices), the sums are all-reduced. The ELBO family:
   ELBO, IWAE NLL, bits/dim, KL per dimension, within `loss.eval_memory_mb` per rank, with a progress bar on
   rank 0 (stderr); aekl: PSNR, SSIM, LPIPS and rFID when their weights are local, the latent statistics.
2. `save_evaluation` (rank 0): metrics.json, evaluation.json (the objective's details, why a metric is not
   finite, the model spec of the newest checkpoint with aekl's latent statistics, the champion criterion and
   tags to register with), input_example.npy and the objective's plots/ in output_dir. From here on nothing
   needs the data, the devices or the tracking server.
3. the metrics to the run's journal, and with tracking.finalize "register" the journal's `publish` entry.
`publish` (rank 0 through the journal, so a tracking server that is down costs nothing: see vae/tracking.py; or
the flow's register task, which launches training with tracking.finalize "evaluate" and then calls it): the plots
and evaluation.json as artifacts, the model logged and registered from the newest checkpoint, rebuilt from the
spec in its meta.json. Registering twice from one run is refused, so a retry is harmless.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import subprocess
import warnings
from pathlib import Path

import numpy as np
import torch

import pipeline
from vae import checkpoint, provenance, tracking
from vae.config import RunConfig
from vae.data import to_input
from vae.errors import TrainingError
from vae.losses import unwrap
from vae.objective import FinalEvaluation, Objective, build_objective, objective_class
from vae.spec import checkpoint_spec, load_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout, when vaepipe runs from one
METRICS_FILE, DETAILS_FILE, EXAMPLE_FILE, PLOTS_DIR = "metrics.json", "evaluation.json", "input_example.npy", "plots"
PLOT_IMAGES = 2000  # validation images (of rank 0's slice) encoded for the latent scatter and the picture grids


def load_trained(cfg: RunConfig) -> tuple[torch.nn.Module, dict]:
    """The newest complete checkpoint's weights in a fresh CPU module, rebuilt from its meta.json, and the meta."""
    path = checkpoint.latest(Path(cfg.train.output_dir))
    if path is None:
        raise TrainingError(f"no complete checkpoint in {cfg.train.output_dir}; train first")
    return load_checkpoint(path)


def finish(cfg: RunConfig, accelerator, model: torch.nn.Module, val_loader, journal, global_step: int,
           objective: Objective | None = None) -> None:
    """Every rank, after the last checkpoint: evaluate `model` (the EMA weights when kept) on the training
    devices as its objective (the trainer's; else built from cfg) judges it, then rank 0 saves the evaluation and
    plots, journals the metrics and, with tracking.finalize "register", the registration. tracking.finalize
    "none" does nothing."""
    if cfg.tracking.finalize == "none":
        return
    objective = objective or build_objective(cfg)
    result = objective.final_evaluation(accelerator, model, val_loader)
    if not accelerator.is_main_process:
        return
    save_evaluation(cfg, objective, result, model, val_loader, global_step)
    print(f"final evaluation: {result.headline}; saved in {cfg.train.output_dir}", flush=True)
    journal.log_metrics(finite(result.metrics), step=global_step)
    if cfg.tracking.finalize == "register":
        journal.publish(cfg.train.output_dir)


def save_evaluation(cfg: RunConfig, objective: Objective, result: FinalEvaluation, model: torch.nn.Module,
                    val_loader, global_step: int) -> None:
    """Rank 0: the evaluation, what registering needs, and the objective's plots, written into output_dir."""
    run_dir = Path(cfg.train.output_dir)
    for why in result.nonfinite.values():
        warnings.warn(f"{why}; the model is still saved and registered, but cannot become the champion",
                      stacklevel=2)
    model = copy.deepcopy(unwrap(model)).cpu().eval()  # the plots draw on the CPU; the training copy stays put
    inputs, labels = [], []
    for batch in val_loader:  # the first images of rank 0's slice
        inputs.append(to_input(batch.images, cfg).cpu())
        labels.append(None if batch.labels is None else batch.labels.cpu())
        if sum(len(x) for x in inputs) >= PLOT_IMAGES:
            break
    x = torch.cat(inputs)[:PLOT_IMAGES]
    label_array = None if labels[0] is None else torch.cat(labels)[:PLOT_IMAGES].numpy()
    out = run_dir / PLOTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    objective.draw(model, x, label_array, result, out)
    np.save(run_dir / EXAMPLE_FILE, (x[:4].numpy()).astype(np.float32))
    newest = checkpoint.latest(run_dir)  # the spec the model was trained with, not the live config's
    spec = checkpoint_spec(checkpoint.read_meta(newest))
    if result.latent_stats is not None:  # aekl: the exported diffusers config carries them (vae/aekl_export.py)
        spec = {**spec, "latent_stats": result.latent_stats}
    champion = objective.champion
    details = {**result.details, "global_step": global_step, "nonfinite": result.nonfinite, "model_spec": spec,
               "model_name": cfg.model_name, "champion": champion.tag,
               "tags": version_tags(cfg, result.metrics)}
    (run_dir / METRICS_FILE).write_text(json.dumps(result.metrics, indent=2))  # NaN stays NaN (json reads it)
    (run_dir / DETAILS_FILE).write_text(json.dumps(details, indent=2))


def load_evaluation(output_dir: str | Path) -> tuple[dict[str, float], dict]:
    """The metrics and details `save_evaluation` wrote; a clear error when training did not get that far."""
    run_dir = Path(output_dir)
    if not (run_dir / DETAILS_FILE).is_file():
        raise TrainingError(f"no final evaluation in {run_dir} ({DETAILS_FILE} is missing): training did not finish "
                            "it; rerun training with --train.resume true to evaluate the last checkpoint")
    return json.loads((run_dir / METRICS_FILE).read_text()), json.loads((run_dir / DETAILS_FILE).read_text())


def finite(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics MLflow gets: a NaN or infinite one is left out (its reason goes to a tag instead)."""
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


def log_artifacts(run_dir: Path, run_id: str) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    for f in sorted((run_dir / PLOTS_DIR).glob("*.png")):
        client.log_artifact(run_id, str(f), artifact_path=PLOTS_DIR)
    client.log_artifact(run_id, str(run_dir / DETAILS_FILE))


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


def config_sha256(cfg: RunConfig) -> str:
    """sha256 of the resolved config as sorted, compact JSON: equal configs hash equal across runs."""
    text = json.dumps(cfg.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def version_tags(cfg: RunConfig, metrics: dict[str, float]) -> dict[str, str]:
    """The registered version's provenance and its objective's headline metric tags (ELBO family: val_elbo,
    val_bpd); the champion's metric is the registry's own tag (`vae.registry.Criterion.tag`)."""
    return {
        **objective_class(cfg).version_tags(metrics),
        "shard_index_sha256": pipeline.index_sha256(cfg.shard_dir, cfg.ingest.storage_options),
        "git_commit": git_commit(),
        "config_sha256": config_sha256(cfg),
    }


def register_run(cfg: RunConfig, run_id: str, metrics: dict[str, float] | None = None, uri: str | None = None):
    """Log the trained model (newest checkpoint, EMA weights when kept) to `run_id` as a pyfunc and register it
    with the tags saved by `save_evaluation`; `challenger` goes to the new version, `champion` only if it is the
    best under the objective's criterion (validation NLL; aekl: PSNR), neither if that is not finite. A version
    this run registered already is returned as it is (a retried publish registers nothing twice). Needs only
    output_dir and the tracking server."""
    import mlflow

    from vae import registry

    run_dir = Path(cfg.train.output_dir)
    saved, details = load_evaluation(run_dir)
    metrics = metrics or saved
    mlflow.set_tracking_uri(uri or tracking.resolve_uri(cfg))
    name = details["model_name"]
    client = mlflow.MlflowClient()
    done = [v for v in client.search_model_versions(f"run_id='{run_id}'") if v.name == name]
    if done:
        version = done[0]
        print(f"run {run_id} registered {name} version {version.version} already; nothing to do", flush=True)
        describe(client, cfg, name, version.version, metrics, details)  # a retry after a failure in between
        return registry.RegisteredVersion(name, int(version.version), f"models:/{name}/{version.version}",
                                          "champion" in (version.aliases or []), None)
    path = checkpoint.latest(run_dir)
    if path is None:
        raise TrainingError(f"no complete checkpoint in {run_dir}; train first")
    model, _ = load_checkpoint(path)  # rebuilt from its meta.json: no shard index, no storage options needed
    example = np.load(run_dir / EXAMPLE_FILE, allow_pickle=False)
    log_artifacts(run_dir, run_id)
    run_tags = client.get_run(run_id).data.tags
    # at the checkpoint's step: MLflow then links the final evaluation (logged at that step) to the logged model
    model_uri = registry.log_model(model.eval(), details["model_spec"], run_id, input_example=example,
                                   tags={k: v for k, v in run_tags.items() if k in provenance.SOURCE_TAGS},
                                   step=details["global_step"])
    champion = registry.CRITERIA[details.get("champion", registry.NLL_TAG)]  # older evaluations: the NLL
    reason = details["nonfinite"].get(champion.metric)
    version = registry.register(model_uri, name, metrics.get(champion.metric, math.nan), run_id,
                                tags=details["tags"], nonfinite_reason=reason, criterion=champion)
    describe(client, cfg, name, version.version, metrics, details)
    return version


def describe(client, cfg: RunConfig, name: str, version: int | str, metrics: dict[str, float], details: dict) -> None:
    """Give the model version its description (architecture, data, headline figures) unless it has one."""
    if not client.get_model_version(name, str(version)).description:
        data = f"{cfg.source.name} shards at {cfg.shard_dir}"
        client.update_model_version(name, str(version),
                                    description=provenance.model_description(details, metrics, details["tags"], data))


def publish(output_dir: str | Path, run_id: str, uri: str):
    """Register what a finished training run left in `output_dir` into run `run_id` at `uri`: the journal's
    `publish` entry calls this, at the end of training or later from `python -m vae.tracking`."""
    from vae.config import load_config

    output_dir = Path(output_dir).resolve()
    cfg = load_config(output_dir / "config.yaml")
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"output_dir": output_dir})})
    version = register_run(cfg, run_id, uri=uri)
    print(f"registered {version.uri} (champion: {version.champion})", flush=True)
    return version
