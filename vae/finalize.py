"""After training: evaluate the final weights, draw the pictures, log and register the model.

Called by vae/train.py on rank 0 (tracking.finalize=true), or by the Prefect flow as separate tasks.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

import pipeline
from pipeline import read_split
from vae import checkpoint, plots, tracking
from vae.config import RunConfig
from vae.data import to_input
from vae.evaluate import evaluate
from vae.trainer import TrainingError, build, image_shape_chw, model_options

REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout, when vaepipe runs from one


def load_trained(cfg: RunConfig) -> tuple[torch.nn.Module, dict]:
    """The newest complete checkpoint's weights in a fresh CPU module, and its meta.json."""
    path = checkpoint.latest(Path(cfg.train.output_dir))
    if path is None:
        raise TrainingError(f"no complete checkpoint in {cfg.train.output_dir}; train first")
    model = build(cfg)
    ema = path / "ema.safetensors"  # the EMA weights, when the run kept them, are what gets evaluated and shipped
    model.load_state_dict(load_file(ema if ema.is_file() else path / "model.safetensors"))
    return model.eval(), checkpoint.read_meta(path)


def evaluate_run(cfg: RunConfig, run_id: str) -> dict[str, float]:
    """Validation metrics and plots of the trained model, logged to `run_id` and saved in output_dir.

    Metrics: val/elbo, val/recon, val/kl, val/recon_mse, val/nll_iwae (k = loss.eval_iwae_k), val/bpd,
    val/active_units. KL per dimension and per group go to evaluation.json (an artifact beside the plots).
    """
    model, meta = load_trained(cfg)
    images, labels = read_split(cfg.shard_dir, cfg.data.val_split, cfg.ingest.storage_options,
                                crop_size=cfg.data.crop_size)
    x = torch.from_numpy(images).permute(0, 3, 1, 2)  # (N, C, H, W) uint8
    batches = torch.split(x, 1024)
    torch.manual_seed(cfg.train.seed)  # the same binarisation draws and importance samples on every call

    def prepare(batch: torch.Tensor) -> torch.Tensor:
        return to_input(batch, cfg)

    result = evaluate(model, batches, k=cfg.loss.eval_iwae_k, prepare=prepare)
    metrics = result.metrics

    out = Path(cfg.train.output_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        inputs = [prepare(b) for b in batches]
        mu = torch.cat([model.encode(b)[0] for b in inputs]).numpy()
    first = inputs[0]
    by_kl = sorted(range(model.latent_size), key=lambda d: -result.kl_per_dim[d])[:8]  # the most used dimensions
    files = [
        plots.latent_scatter(mu, labels, out / "latent_scatter.png"),
        plots.samples(model, model.latent_size, out / "samples.png", seed=cfg.train.seed),
        plots.temperatures(model, out / "temperatures.png", seed=cfg.train.seed),
        plots.reconstructions(model, first[:32], out / "reconstructions.png"),
        plots.traversals(model, first[:1], by_kl, out / "traversals.png"),
        plots.interpolations(model, first, out / "interpolations.png"),
    ]
    if model.latent_size == 2:
        files.append(plots.manifold(model, out / "manifold.png"))
    run_dir = Path(cfg.train.output_dir)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    details = {"kl_per_dim": result.kl_per_dim, "kl_per_group": result.kl_per_group, "active": result.active,
               "iwae_k": cfg.loss.eval_iwae_k}
    (run_dir / "evaluation.json").write_text(json.dumps(details, indent=2))

    tracking.configure(cfg)
    tracking.log_metrics(metrics, step=meta["global_step"], run_id=run_id)
    import mlflow

    client = mlflow.MlflowClient()
    for f in files:
        client.log_artifact(run_id, str(f), artifact_path="plots")
    client.log_artifact(run_id, str(run_dir / "evaluation.json"))
    return metrics


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
    """The registered version's provenance and headline metrics (floats as repr: they round-trip exactly);
    the validation NLL is the registry's own tag (`vae.registry.NLL_TAG`)."""
    return {
        "val_elbo": repr(float(metrics["val/elbo"])),
        "val_bpd": repr(float(metrics["val/bpd"])),
        "shard_index_sha256": pipeline.index_sha256(cfg.shard_dir, cfg.ingest.storage_options),
        "git_commit": git_commit(),
        "config_sha256": config_sha256(cfg),
    }


def register_run(cfg: RunConfig, run_id: str, metrics: dict[str, float]):
    """Log the trained model to `run_id` as a pyfunc and register it with its tags (`version_tags`); the alias
    `challenger` goes to the new version, `champion` only if its validation NLL is the best."""
    from vae import registry

    model, _ = load_trained(cfg)
    tracking.configure(cfg)
    spec = registry.model_spec(cfg.model.arch, image_shape_chw(cfg), cfg.model.latent_dim, **model_options(cfg))
    images, _ = read_split(cfg.shard_dir, cfg.data.val_split, cfg.ingest.storage_options,
                                crop_size=cfg.data.crop_size)
    example = (images[:4].transpose(0, 3, 1, 2) / 255.0).astype(np.float32)
    uri = registry.log_model(model, spec, run_id, input_example=example)
    return registry.register(uri, cfg.model_name, metrics["val/nll_iwae"], run_id, tags=version_tags(cfg, metrics))


def finalize(cfg: RunConfig, run_id: str):
    metrics = evaluate_run(cfg, run_id)
    return metrics, register_run(cfg, run_id, metrics)
