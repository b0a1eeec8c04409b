"""After training: the one post-training path, for `vae/train.py` and the Prefect flow alike, up to what the
registry needs (vae/registry/publish.py takes it from there).

`finalize` (called by the trainer at the end of every run, whoever launched it):
1. the objective's `final_evaluation` (vae/objectives; every rank, on its device): each rank evaluates its exact
   slice of the validation split (the loader's pad=False slices), the sums are all-reduced. The ELBO family:
   ELBO, IWAE NLL, bits/dim, KL per dimension, within `loss.eval_memory_mb` per rank, with a progress bar on
   rank 0 (stderr); aekl: PSNR, SSIM, LPIPS and rFID when their weights are local, the latent statistics.
2. `save_evaluation` (rank 0): metrics.json, evaluation.json (the objective's details, why a metric is not
   finite, the model spec of the newest checkpoint with aekl's latent statistics, the champion criterion and
   tags to register with, the headline and the picture a report shows), input_example.npy and the objective's
   plots/ in output_dir; aekl's evaluation protocol (vae/objectives/aekl/protocol.py) in evaluation.json and its
   digest among the tags. From here on nothing needs the data, the devices or the tracking server.
3. the metrics to the run's journal, and with tracking.finalize "register" the journal's `publish` entry.
The journal's publish entry is sent by its publisher, `vae.registry.publish.publish_run` (rank 0 through the
journal, so a tracking server that is down costs nothing: see vae/tracking/journal.py; or the flow's publish
task, which launches training with tracking.finalize "evaluate" and then calls it).
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import torch

import pipeline
from vae.config import RunConfig, config_sha256
from vae.objectives import FinalEvaluation, Objective, build_objective, objective_class, unwrap
from vae.objectives.inputs import to_input
from vae.tracking.metrics import finite
from vae.tracking.provenance import git_commit
from vae.training import checkpoint
from vae.training.errors import TrainingError
from vae.training.trained import checkpoint_spec

METRICS_FILE, DETAILS_FILE, EXAMPLE_FILE, PLOTS_DIR = "metrics.json", "evaluation.json", "input_example.npy", "plots"
PLOT_IMAGES = 2000  # validation images (of rank 0's slice) encoded for the latent scatter and the picture grids


def finalize(cfg: RunConfig, accelerator, model: torch.nn.Module, val_loader, journal, global_step: int,
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
    if result.latent_stats is not None:  # aekl: the exported diffusers config carries them (vae/registry/diffusers.py)
        spec = {**spec, "latent_stats": result.latent_stats}
    champion, picture = objective.champion, objective.picture
    details = {**result.details, "global_step": global_step, "nonfinite": result.nonfinite, "model_spec": spec,
               "model_name": cfg.model_name, "champion": champion.tag,
               # aekl: the evaluation protocol's digest and fields, so the registry compares like with like
               "tags": {**version_tags(cfg, result.metrics), **result.protocol_tags},
               # what a report shows of the run (flows/train_vae.py, `vaepipe demo`), whatever the architecture
               "headline": result.headline,
               "picture": None if picture is None else {"file": f"{PLOTS_DIR}/{picture.file}",
                                                        "caption": picture.caption}}
    (run_dir / METRICS_FILE).write_text(json.dumps(result.metrics, indent=2))  # NaN stays NaN (json reads it)
    (run_dir / DETAILS_FILE).write_text(json.dumps(details, indent=2))


def load_evaluation(output_dir: str | Path) -> tuple[dict[str, float], dict]:
    """The metrics and details `save_evaluation` wrote; a clear error when training did not get that far."""
    run_dir = Path(output_dir)
    if not (run_dir / DETAILS_FILE).is_file():
        raise TrainingError(f"no final evaluation in {run_dir} ({DETAILS_FILE} is missing): training did not finish "
                            "it; rerun training with --train.resume true to evaluate the last checkpoint")
    return json.loads((run_dir / METRICS_FILE).read_text()), json.loads((run_dir / DETAILS_FILE).read_text())


def version_tags(cfg: RunConfig, metrics: dict[str, float]) -> dict[str, str]:
    """The registered version's provenance and its objective's headline metric tags (ELBO family: val_elbo,
    val_bpd); the champion's metric is the registry's own tag (`vae.objectives.Criterion.tag`)."""
    return {
        **objective_class(cfg).version_tags(metrics),
        "shard_index_sha256": pipeline.index_sha256(cfg.shard_dir, cfg.ingest.storage_options),
        "git_commit": git_commit(),
        "config_sha256": config_sha256(cfg),
    }
