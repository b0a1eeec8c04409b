"""After training: evaluate the final weights, draw the pictures, log and register the model.

Called by vae/train.py on rank 0 (tracking.finalize=true), or by the Prefect flow as separate tasks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from pipeline import read_split
from vae import checkpoint, plots, tracking
from vae.config import RunConfig
from vae.data import to_input
from vae.evaluate import evaluate
from vae.trainer import TrainingError, build, image_shape_chw, model_options


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
    images, labels = read_split(cfg.shard_dir, cfg.data.val_split, cfg.ingest.storage_options)
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


def register_run(cfg: RunConfig, run_id: str, metrics: dict[str, float]):
    """Log the trained model to `run_id` as a pyfunc and register it; the champion alias moves only if better."""
    from vae import registry

    model, _ = load_trained(cfg)
    tracking.configure(cfg)
    spec = registry.model_spec(cfg.model.arch, image_shape_chw(cfg), cfg.model.latent_dim, **model_options(cfg))
    images, _ = read_split(cfg.shard_dir, cfg.data.val_split, cfg.ingest.storage_options)
    example = (images[:4].transpose(0, 3, 1, 2) / 255.0).astype(np.float32)
    uri = registry.log_model(model, spec, run_id, input_example=example)
    return registry.register(uri, cfg.model_name, metrics["val/elbo"], run_id)


def finalize(cfg: RunConfig, run_id: str):
    metrics = evaluate_run(cfg, run_id)
    return metrics, register_run(cfg, run_id, metrics)
