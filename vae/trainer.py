"""The training loop. Reads top to bottom: build, resume, then per epoch train, validate, checkpoint.

Accelerate does devices, DDP, mixed precision, gradient accumulation and save/load of state. The data loader
is ours (pipeline.ShardLoader, one slice per rank) and deliberately not passed to `accelerator.prepare()`.
Rank 0 alone talks to MLflow.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from pipeline import read_index
from vae import checkpoint, tracking
from vae.config import RunConfig, dump
from vae.data import build_loaders, to_input
from vae.evaluate import evaluation_sums, to_metrics
from vae.losses import training_loss
from vae.models import build_model

log = logging.getLogger("vaepipe.train")

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


class TrainingError(RuntimeError):
    """The run cannot start or continue; the message says why and what to do."""


def image_shape_chw(cfg: RunConfig) -> tuple[int, int, int]:
    h, w, c = read_index(cfg.shard_dir).image_shape
    return (c, h, w)


def model_options(cfg: RunConfig) -> dict:
    """Architecture-specific constructor arguments taken from the model section."""
    return {"hidden_dim": cfg.model.hidden_dim} if cfg.model.arch == "mlp" else {}


def build(cfg: RunConfig) -> torch.nn.Module:
    return build_model(cfg.model.arch, image_shape_chw(cfg), cfg.model.latent_dim, **model_options(cfg))


def param_checksum(model: torch.nn.Module) -> torch.Tensor:
    """Sum of all parameters in float64: equal on every rank iff DDP kept the replicas in step."""
    return torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()


def train(cfg: RunConfig) -> None:
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
    )
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    expected = cfg.train.expected_world_size
    if expected is not None and expected != world:
        raise TrainingError(
            f"expected {expected} processes but the launcher started {world}. On a CPU host, two real ranks need "
            "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 (--cpu starts only one)"
        )
    set_seed(cfg.train.seed)
    output_dir = Path(cfg.train.output_dir)
    resume_from = checkpoint.latest(output_dir) if cfg.train.resume else None
    if not cfg.train.resume and checkpoint.latest(output_dir) is not None:
        raise TrainingError(
            f"{output_dir} already holds checkpoints of an earlier run; pass --train.resume true to continue it "
            "or choose another --train.output_dir"
        )

    model = build(cfg)
    optimizer = OPTIMIZERS[cfg.optim.name](model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    train_loader, val_loader = build_loaders(cfg, rank, world)
    model, optimizer = accelerator.prepare(model, optimizer)
    progress = checkpoint.TrainProgress()
    accelerator.register_for_checkpointing(progress)

    run_id = None
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        run_id = checkpoint.read_meta(resume_from).get("mlflow_run_id")
        if main:
            print(f"resuming from {resume_from} (epoch {progress.epoch}, step {progress.global_step})", flush=True)
    elif cfg.train.resume and main:
        print(f"no complete checkpoint in {output_dir}; starting from scratch", flush=True)
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(dump(cfg))
        run_id = tracking.start_or_resume(cfg, run_id).info.run_id

    device = accelerator.device
    steps_per_epoch = len(train_loader) // cfg.train.gradient_accumulation_steps
    for epoch in range(progress.epoch, cfg.train.epochs):
        # ---- train one epoch
        model.train()
        train_loader.set_epoch(epoch)
        running = torch.zeros(4, dtype=torch.float64, device=device)  # loss, elbo, recon, kl sums; no per-step sync
        seen, tick = 0, time.perf_counter()
        bar = tqdm(total=len(train_loader), desc=f"epoch {epoch + 1}/{cfg.train.epochs}", disable=not main)
        for i, batch in enumerate(train_loader):
            x = to_input(batch.images.to(device, non_blocking=True), cfg)
            with accelerator.accumulate(model):
                terms = training_loss(model, x, cfg.loss, progress.global_step)  # autocast: accelerate's forward
                accelerator.backward(terms.loss)
                grad_norm = None
                if accelerator.sync_gradients and cfg.optim.grad_clip is not None:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            parts = (terms.loss * len(x), terms.elbo.sum(), terms.recon.sum(), terms.kl.sum())
            running += torch.stack(parts).detach().double()
            seen += len(x)
            if accelerator.sync_gradients:
                progress.global_step += 1
            bar.update(1)
            last = i == len(train_loader) - 1
            if (accelerator.sync_gradients and progress.global_step % cfg.train.log_every == 0) or last:
                # A host sync and an all-reduce: every rank reaches this line at the same step.
                totals = accelerator.reduce(torch.cat([running, running.new_tensor([seen])]), "sum").tolist()
                elapsed = time.perf_counter() - tick
                n = totals[-1]
                metrics = {
                    "train/loss": totals[0] / n, "train/elbo": totals[1] / n, "train/recon": totals[2] / n,
                    "train/kl": totals[3] / n, "train/lr": optimizer.param_groups[0]["lr"],
                    "train/samples_per_s": n / elapsed,
                }
                if grad_norm is not None:
                    metrics["train/grad_norm"] = float(grad_norm)
                if main:
                    tracking.log_metrics(metrics, step=progress.global_step)
                    bar.set_postfix(loss=f"{metrics['train/loss']:.2f}", img_s=f"{metrics['train/samples_per_s']:.0f}")
                running.zero_()
                seen, tick = 0, time.perf_counter()
        bar.close()

        # ---- validate: each rank its exact slice, one all-reduce of the sums
        sums = evaluation_sums(accelerator.unwrap_model(model), (b.images for b in val_loader), device)
        val = to_metrics(accelerator.reduce(sums, "sum"))
        if main:
            tracking.log_metrics(val, step=progress.global_step)
            print(f"epoch {epoch + 1}: val ELBO {val['val/elbo']:.3f} nats (recon {val['val/recon']:.3f}, "
                  f"KL {val['val/kl']:.3f}), recon MSE {val['val/recon_mse']:.4f}", flush=True)

        # ---- checkpoint: state from every rank, meta.json last from rank 0
        progress.epoch = epoch + 1
        checksums = accelerator.gather(param_checksum(model).reshape(1)).tolist()
        if len(set(checksums)) != 1:
            raise TrainingError(f"the ranks' weights diverged after epoch {epoch + 1}: checksums {checksums}")
        path = checkpoint.epoch_dir(output_dir, progress.epoch)
        accelerator.save_state(str(path))
        if main:
            checkpoint.write_meta(path, {
                **progress.state_dict(), "steps_per_epoch": steps_per_epoch, "world_size": world,
                "rank_param_checksums": checksums, "mlflow_run_id": run_id, "val": val,
                "config": cfg.model_dump(mode="json"),
            })
            checkpoint.prune(output_dir, cfg.train.keep_checkpoints)
        accelerator.wait_for_everyone()

    if main and cfg.tracking.finalize:
        from vae.finalize import finalize

        metrics, version = finalize(cfg, run_id)
        elbo = metrics["val/elbo"]
        print(f"registered {version.uri} (champion: {version.champion}); val ELBO {elbo:.3f}", flush=True)
    if main:
        import mlflow

        mlflow.end_run()
    accelerator.wait_for_everyone()
    accelerator.end_training()
