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
from vae.evaluate import evaluation_sums, to_metrics, to_unit
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
    """Validation metrics and plots of the trained model, logged to `run_id` and saved in output_dir."""
    model, meta = load_trained(cfg)
    images, labels = read_split(cfg.shard_dir, cfg.data.val_split)
    x = torch.from_numpy(images).permute(0, 3, 1, 2)  # (N, C, H, W) uint8
    batches = torch.split(x, 1024)
    metrics = to_metrics(evaluation_sums(model, batches, torch.device("cpu")))

    out = Path(cfg.train.output_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        mu = torch.cat([model.encode(to_unit(b))[0] for b in batches]).numpy()
    files = [
        plots.latent_scatter(mu, labels, out / "latent_scatter.png"),
        plots.samples(model, cfg.model.latent_dim, out / "samples.png", seed=cfg.train.seed),
        plots.reconstructions(model, to_unit(x[:32]), out / "reconstructions.png"),
    ]
    if cfg.model.latent_dim == 2:
        files.append(plots.manifold(model, out / "manifold.png"))
    (Path(cfg.train.output_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2))

    tracking.configure(cfg)
    tracking.log_metrics(metrics, step=meta["global_step"], run_id=run_id)
    import mlflow

    client = mlflow.MlflowClient()
    for f in files:
        client.log_artifact(run_id, str(f), artifact_path="plots")
    return metrics


def register_run(cfg: RunConfig, run_id: str, metrics: dict[str, float]):
    """Log the trained model to `run_id` as a pyfunc and register it; the champion alias moves only if better."""
    from vae import registry

    model, _ = load_trained(cfg)
    tracking.configure(cfg)
    spec = registry.model_spec(cfg.model.arch, image_shape_chw(cfg), cfg.model.latent_dim, **model_options(cfg))
    images, _ = read_split(cfg.shard_dir, cfg.data.val_split)
    example = (images[:4].transpose(0, 3, 1, 2) / 255.0).astype(np.float32)
    uri = registry.log_model(model, spec, run_id, input_example=example)
    return registry.register(uri, cfg.model_name, metrics["val/elbo"], run_id)


def finalize(cfg: RunConfig, run_id: str):
    metrics = evaluate_run(cfg, run_id)
    return metrics, register_run(cfg, run_id, metrics)
