"""The training loop. Reads top to bottom: build, resume, then per epoch train, validate, checkpoint.

Accelerate does devices, DDP, mixed precision, gradient accumulation and save/load of state. The data loader
is ours (pipeline.ShardLoader, one slice per rank) and deliberately not passed to `accelerator.prepare()`.
Rank 0 alone talks to MLflow, through a journal in the output directory (tracking.MetricJournal): a tracking
server that stops and comes back costs no metric and stalls no step. SIGTERM or SIGINT finishes the current
step, writes a checkpoint and exits with PREEMPTED_EXIT, so an orchestrator can retry with --train.resume true
and lose nothing. Corrupt shards stop the run or are skipped per data.on_corrupt_shard (see pipeline.loader).
"""

from __future__ import annotations

import errno
import math
import os
import pickle
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from pipeline import ShardLoader
from vae import checkpoint, tracking
from vae.config import RunConfig, dump
from vae.data import build_loaders, image_shape, to_input
from vae.evaluate import evaluation_sums, to_metrics
from vae.graphs import compile_options
from vae.losses import training_loss
from vae.models import build_model
from vae.optim import Lamb, MuonAdamW, step_kernels
from vae.preemption import PREEMPTED_EXIT, Preemption
from vae.schedule import lr_at, scaled_lr

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "lamb": Lamb, "muon": MuonAdamW}
EMA_WEIGHTS = checkpoint.EMA_WEIGHTS
# What loading a damaged or planted checkpoint file raises: our own checks, safetensors, torch.load's zip reader
# and its weights_only unpickler, a state of the wrong shape.
LOAD_ERRORS = (checkpoint.CheckpointError, SafetensorError, pickle.UnpicklingError, OSError, ValueError, KeyError,
               TypeError, RuntimeError)


class TrainingError(RuntimeError):
    """The run cannot start or continue; the message says why and what to do."""


def image_shape_chw(cfg: RunConfig) -> tuple[int, int, int]:
    return image_shape(cfg)


def model_options(cfg: RunConfig) -> dict:
    """Constructor arguments for cfg.model.arch: its model section's fields (exactly what the constructor
    takes: one config section per architecture), plus the output head chosen by the loss section."""
    return {**cfg.model.model_dump(exclude={"arch", "latent_dim"}),
            **cfg.loss.model_dump(include={"likelihood", "mixtures", "gaussian_std"})}


def build(cfg: RunConfig) -> torch.nn.Module:
    return build_model(cfg.model.arch, image_shape_chw(cfg), cfg.model.latent_dim, **model_options(cfg))


def param_checksum(model: torch.nn.Module) -> torch.Tensor:
    """Sum of all parameters in float64: equal on every rank iff DDP kept the replicas in step."""
    return torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()


def resolve_precision(cfg: RunConfig) -> str:
    """`auto`: what `accelerate launch --mixed_precision` named, else bf16 where the GPU has it, else fp32."""
    if cfg.train.mixed_precision != "auto":
        return cfg.train.mixed_precision
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher != "no":
        return launcher
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def skipped_shards(accelerator: Accelerator, loaders: dict[str, ShardLoader]) -> dict[str, list[str]]:
    """Per split, the shards any rank skipped as corrupt so far: a rank knows only those it read (one all-reduce)."""
    mask = [name in loader.skipped_shards for loader in loaders.values() for name in loader.names]
    hits = accelerator.reduce(torch.tensor(mask, dtype=torch.float32, device=accelerator.device), "sum").tolist()
    out, first = {}, 0
    for split, loader in loaders.items():
        mine = hits[first : first + len(loader.names)]
        out[split] = [name for name, hit in zip(loader.names, mine, strict=True) if hit]
        first += len(loader.names)
    return out


def state_bytes(optimizer: torch.optim.Optimizer, model: torch.nn.Module, ema: AveragedModel | None) -> int:
    """Bytes of the tensors a checkpoint holds: what a first save needs at least."""
    tensors = [*model.state_dict().values(), *(v for s in optimizer.state.values() for v in s.values())]
    if ema is not None:
        tensors += list(ema.module.state_dict().values())
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class StepGuard:
    """Counts optimiser steps skipped for non-finite gradients; stops the run after `limit` in a row."""

    def __init__(self, limit: int) -> None:
        self.limit, self.in_a_row, self.total = limit, 0, 0

    def record(self, skipped: bool, step: int) -> None:
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        self.total += int(skipped)
        if self.in_a_row >= self.limit:
            raise TrainingError(
                f"{self.in_a_row} optimiser steps in a row had non-finite gradients (the last at step {step}); "
                "lower optim.lr, set optim.grad_clip, or train in bf16 rather than fp16"
            )

    def state_dict(self) -> dict[str, int]:
        return {"in_a_row": self.in_a_row, "total": self.total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.in_a_row, self.total = int(state["in_a_row"]), int(state["total"])


def refuse_changes(cfg: RunConfig, meta: dict, path: Path, world: int, global_batch: int) -> None:
    """Raise TrainingError naming every field in which this run differs from the checkpoint it would resume,
    except checkpoint.RESUMABLE_CHANGES: a run resumed with another batch size, world size, model or optimiser
    would silently mix two runs (or die in load_state_dict)."""
    changes = checkpoint.config_changes(meta.get("config", {}), cfg.model_dump(mode="json"))
    for name, now in (("world size", world), ("global batch", global_batch)):
        key = name.replace(" ", "_")
        if key in meta and meta[key] != now:
            changes.append(f"{name}: {meta[key]!r} -> {now!r}")
    if changes:
        raise TrainingError(
            f"cannot resume {path} with a changed config ({len(changes)} field(s), checkpoint -> now): "
            + "; ".join(changes) + ". Resume with the checkpoint's values (its meta.json holds the config), or "
            "start a new --train.output_dir. Fields that may change on resume: " + ", ".join(
                c + "*" if c.endswith(".") else c for c in checkpoint.RESUMABLE_CHANGES)
        )


def no_space_error(err: BaseException, output_dir: Path, needed: int) -> TrainingError | None:
    """A TrainingError saying the disk under `output_dir` is full, or None when `err` is something else.
    torch.save reports a full disk as a RuntimeError ("basic_ios::clear: iostream error", "file write failed")
    without an errno, so the free space decides there."""
    root = checkpoint.checkpoint_root(output_dir)
    free = shutil.disk_usage(root if root.is_dir() else output_dir).free
    if not ((isinstance(err, OSError) and err.errno == errno.ENOSPC) or free < needed):
        return None
    kept = [p.name for p in checkpoint.complete_checkpoints(output_dir)]
    return TrainingError(
        f"no space left on {root}: a checkpoint needs about {needed:,} bytes and {free:,} are free "
        f"({type(err).__name__}: {err}). The older checkpoints are kept ({', '.join(kept) or 'none'}); free space "
        "or move --train.output_dir, then continue with --train.resume true"
    )


def train(cfg: RunConfig) -> None:
    preemption = Preemption()  # first: a signal during start-up must not kill the process half-way either
    accelerator = Accelerator(
        mixed_precision=resolve_precision(cfg), gradient_accumulation_steps=cfg.train.gradient_accumulation_steps
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

    # ---- build: model, optimiser, loaders, and everything a checkpoint must hold
    model = build(cfg)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        # in place: state_dict keys stay as they are, checkpoints stay portable
        model.compile(**compile_options(cfg.train.cuda_graphs, accelerator.device, TrainingError))
    optimizer = OPTIMIZERS[cfg.optim.name](
        model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
        weight_decay=cfg.optim.weight_decay, **step_kernels(cfg.optim.name, accelerator.device),
    )
    train_loader, val_loader = build_loaders(cfg, rank, world, device=accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = None
    if cfg.train.ema_decay is not None:
        ema = AveragedModel(accelerator.unwrap_model(model), multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema_decay))
    # Not registered with Accelerate, which would pickle them: `save` and `load` keep them in JSON.
    progress, guard = checkpoint.TrainProgress(), StepGuard(cfg.train.max_nonfinite_steps)

    accumulation = cfg.train.gradient_accumulation_steps
    global_batch = cfg.train.batch_size * world * accumulation

    def load(path: Path, meta: dict) -> None:
        """Every state in `path`, from safe formats only; raises one of LOAD_ERRORS, naming the file."""
        checkpoint.verify(path, meta, rank)  # nothing but our files, each of its recorded size
        state = checkpoint.read_json(path / checkpoint.TRAIN_STATE)
        rng = checkpoint.read_json(path / f"rng-{rank}.json")
        ema_weights = checkpoint.read_tensors(path / EMA_WEIGHTS) if ema is not None else None
        # model from safetensors; optimiser (and fp16 scaler) through torch.load(weights_only=True). Nothing is
        # registered, so no custom_checkpoint pickle is read; the RNG pickle it looks for is not there.
        try:
            accelerator.load_state(str(path), load_kwargs={"weights_only": True})
        except LOAD_ERRORS as err:
            raise checkpoint.CheckpointError(checkpoint.blame(path, err)) from err
        if ema is not None:
            ema.module.load_state_dict(ema_weights)
            ema.n_averaged.fill_(int(state["ema_n_averaged"]))
        progress.load_state_dict(state["progress"])
        train_loader.load_state_dict(state["loader"])
        guard.load_state_dict(state["step_guard"])
        accelerator.step = int(state["accelerator_step"])  # where gradient accumulation stands
        checkpoint.set_rng_state(rng)

    def resume(candidates: list[Path]) -> Path:
        """Load the newest checkpoint that loads on every rank; warn about and set aside the newer ones."""
        skipped = []
        for path in reversed(candidates):
            try:
                meta = checkpoint.read_json(path / checkpoint.META)
            except checkpoint.CheckpointError as err:
                meta, error = None, str(err)
            if meta is not None:
                refuse_changes(cfg, meta, path, world, global_batch)  # another config: refused, never a fallback
                try:
                    load(path, meta)
                    error = None
                except LOAD_ERRORS as err:
                    error = f"{type(err).__name__}: {err}"
            if error is not None:
                print(f"warning: rank {rank}: checkpoint {path} cannot be loaded: {error}", flush=True)
            # every rank must resume from the same checkpoint: one that fails on any rank is skipped by all
            failed = torch.tensor([float(error is not None)], device=accelerator.device)
            if accelerator.reduce(failed, "sum").item() == 0:
                if main:
                    for bad, why in skipped:
                        print(f"warning: skipped checkpoint {bad} ({why}); moved it to {checkpoint.set_aside(bad)}, "
                              f"resuming from the newest one that loads, {path.name}", flush=True)
                accelerator.wait_for_everyone()
                return path
            skipped.append((path, error or "another rank could not load it"))
        raise TrainingError(
            f"no checkpoint in {checkpoint.checkpoint_root(output_dir)} loads: "
            + "; ".join(f"{p.name}: {why}" for p, why in skipped)
            + ". Move them aside to start over in this directory, or choose another --train.output_dir"
        )

    run_id, journal = None, None
    if resume_from is not None:
        resume_from = resume(checkpoint.complete_checkpoints(output_dir))
        run_id = checkpoint.read_meta(resume_from).get("mlflow_run_id")
        if main:
            print(f"resuming from {resume_from} (epoch {progress.epoch}, step {progress.global_step}, "
                  f"loader at batch {train_loader.position} of epoch {train_loader.epoch + 1})", flush=True)
    elif cfg.train.resume and main:
        print(f"no complete checkpoint in {output_dir}; starting from scratch", flush=True)
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(dump(cfg))
        journal = tracking.open_journal(cfg, output_dir, run_id)  # also sends what a killed run left unsent
        run_id = journal.run_id

    def save(reason: str, val: dict[str, float] | None = None) -> Path:
        """State from every rank, then EMA weights and meta.json (last) from rank 0."""
        checksums = accelerator.gather(param_checksum(model).reshape(1)).tolist()
        if len(set(checksums)) != 1:
            raise TrainingError(f"the ranks' weights diverged by step {progress.global_step}: checksums {checksums}")
        target = checkpoint.step_dir(output_dir, progress.global_step)
        previous = checkpoint.latest(output_dir)
        # A complete checkpoint at this step (a preemption at the epoch's last batch, resumed) is replaced only once
        # the new one is complete: it is written beside it first. An incomplete one is our own failed save's.
        path = target.with_name(f".new-{target.name}") if (target / checkpoint.META).is_file() else target
        accelerator.wait_for_everyone()  # every rank has chosen `path` before rank 0 clears it
        if main and path.exists():
            shutil.rmtree(path)
        accelerator.wait_for_everyone()
        try:
            accelerator.save_state(str(path))  # model (safetensors), optimiser and fp16 scaler (torch.save)
            # Accelerate always pickles the RNG states too: we keep them in JSON, so that no checkpoint holds a pickle
            (path / f"random_states_{rank}.pkl").unlink()
            checkpoint.write_json(path / f"rng-{rank}.json", checkpoint.rng_state())
            if main:
                if ema is not None:
                    save_file({k: v.detach().cpu().contiguous() for k, v in ema.module.state_dict().items()},
                              path / EMA_WEIGHTS)
                checkpoint.write_json(path / checkpoint.TRAIN_STATE, {
                    "progress": progress.state_dict(), "loader": train_loader.state_dict(),
                    "step_guard": guard.state_dict(), "accelerator_step": accelerator.step,
                    "ema_n_averaged": int(ema.n_averaged) if ema is not None else 0,
                })
            accelerator.wait_for_everyone()  # every rank's files are in place before rank 0 marks it complete
            if main:
                checkpoint.write_meta(path, {
                    **progress.state_dict(), "reason": reason, "loader": train_loader.state_dict(),
                    "steps_per_epoch": steps_per_epoch, "world_size": world, "global_batch": global_batch,
                    "rank_param_checksums": checksums, "skipped_steps": guard.total, "mlflow_run_id": run_id,
                    "val": val, "config": cfg.model_dump(mode="json"),
                })
        except (OSError, RuntimeError, SafetensorError) as err:
            needed = checkpoint.size(previous) if previous is not None else state_bytes(optimizer, model, ema)
            full = no_space_error(err, output_dir, needed)
            if main and not (path / checkpoint.META).is_file():
                shutil.rmtree(path, ignore_errors=True)  # our incomplete write: its space goes back to the disk
            if full is not None:
                raise full from err
            raise
        if main:
            if path != target:
                replaced = target.with_name(f".old-{target.name}")
                if replaced.exists():  # left by a crash between the two renames below; `target` is the newer
                    shutil.rmtree(replaced)
                target.rename(replaced)
                path.rename(target)
                shutil.rmtree(replaced)
            checkpoint.prune(output_dir, cfg.train.keep_checkpoints)  # only now that the new one is complete
        accelerator.wait_for_everyone()
        return target

    # ---- schedule: pure functions of the optimiser step
    peak_lr = scaled_lr(cfg.optim.lr, global_batch, cfg.optim.reference_batch, cfg.optim.lr_scaling)
    steps_per_epoch = len(train_loader) // accumulation
    total_steps = steps_per_epoch * cfg.train.epochs
    fp16_scaler = accelerator.scaler is not None  # the scaler skips overflowing steps itself and must see them
    device = accelerator.device

    for epoch in range(progress.epoch, cfg.train.epochs):
        # ---- train one epoch (possibly the rest of one, after a mid-epoch resume)
        model.train()
        train_loader.set_epoch(epoch)
        running = torch.zeros(4, dtype=torch.float64, device=device)  # loss, elbo, recon, kl sums; no per-step sync
        seen, tick, grad_norm = 0, time.perf_counter(), None
        bar = tqdm(total=len(train_loader), initial=train_loader.position, desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                   disable=not main)
        for batch in train_loader:
            x = to_input(batch.images.to(device, non_blocking=True), cfg)
            if cfg.train.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            lr = lr_at(progress.global_step, total_steps, peak_lr, cfg.optim.warmup_steps, cfg.optim.schedule,
                       cfg.optim.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            stop = False
            with accelerator.accumulate(model):
                terms = training_loss(model, x, cfg.loss, progress.global_step)  # autocast: accelerate's forward
                accelerator.backward(terms.loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or math.inf)
                    # The one host sync per optimiser step: whether to step, and whether any rank must stop.
                    flags = torch.stack([(~torch.isfinite(grad_norm)).float(),
                                         torch.tensor(float(preemption.requested), device=device)])
                    nonfinite, stop = (accelerator.reduce(flags, "sum") if world > 1 else flags).gt(0).tolist()
                    if fp16_scaler or not nonfinite:
                        optimizer.step()
                    skipped = accelerator.optimizer_step_was_skipped if fp16_scaler else nonfinite
                    guard.record(skipped, progress.global_step)
                    if ema is not None and not skipped:
                        ema.update_parameters(accelerator.unwrap_model(model))
                    progress.global_step += 1
                optimizer.zero_grad(set_to_none=True)
            parts = (terms.loss * len(x), terms.elbo.sum(), terms.recon.sum(), terms.kl.sum())
            running += torch.stack(parts).detach().double()
            seen += len(x)
            bar.update(1)
            last = train_loader.position == len(train_loader)
            if (accelerator.sync_gradients and progress.global_step % cfg.train.log_every == 0) or last:
                # A host sync and an all-reduce: every rank reaches this line at the same step.
                totals = accelerator.reduce(torch.cat([running, running.new_tensor([seen])]), "sum").tolist()
                n = totals[-1]
                metrics = {
                    "train/loss": totals[0] / n, "train/elbo": totals[1] / n, "train/recon": totals[2] / n,
                    "train/kl": totals[3] / n, "train/lr": lr, "train/skipped_steps": guard.total,
                    "train/samples_per_s": n / (time.perf_counter() - tick),
                }
                if grad_norm is not None:
                    metrics["train/grad_norm"] = float(grad_norm)
                if main:
                    journal.log_metrics(metrics, step=progress.global_step)
                    bar.set_postfix(loss=f"{metrics['train/loss']:.2f}", img_s=f"{metrics['train/samples_per_s']:.0f}")
                running.zero_()
                seen, tick = 0, time.perf_counter()
            if stop:  # after the log above: a preempted step that is due to be logged is logged
                path = save("preempted")
                if main:
                    print(f"preempted: wrote {path}; resume with --train.resume true", flush=True)
                    journal.close("KILLED")
                raise SystemExit(PREEMPTED_EXIT)
        bar.close()

        # ---- validate (the EMA weights when kept): each rank its exact slice, one all-reduce of the sums
        evaluated = ema.module if ema is not None else accelerator.unwrap_model(model)
        # validation sees the inputs training sees (binarised or dequantised per data.*)
        sums = evaluation_sums(evaluated, (b.images for b in val_loader), device, prepare=lambda im: to_input(im, cfg))
        val = to_metrics(accelerator.reduce(sums, "sum"))
        skipped = skipped_shards(accelerator, {"train": train_loader, "val": val_loader})
        if main:
            journal.log_metrics({**val, "train/skipped_shards": len(skipped["train"]),
                                 "val/skipped_shards": len(skipped["val"])}, step=progress.global_step)
            if skipped["train"] or skipped["val"]:
                print(f"warning: skipped corrupt shards (data.on_corrupt_shard skip): train {skipped['train']}, "
                      f"val {skipped['val']}; check them with `vaepipe verify {cfg.shard_dir}` and re-ingest",
                      flush=True)
            print(f"epoch {epoch + 1}: val ELBO {val['val/elbo']:.3f} nats (recon {val['val/recon']:.3f}, "
                  f"KL {val['val/kl']:.3f}), recon MSE {val['val/recon_mse']:.4f}", flush=True)

        # ---- checkpoint
        progress.epoch = epoch + 1
        save("end of epoch", val)

    # ---- final evaluation on the training devices (every rank its slice), kept in output_dir; registration goes
    # through the journal, so a tracking server that is down costs neither the model nor the evaluation
    published = True
    if cfg.tracking.finalize != "none":
        from vae.finalize import final_evaluation, finite, save_evaluation

        evaluated = ema.module if ema is not None else accelerator.unwrap_model(model)
        result = final_evaluation(cfg, accelerator, evaluated, val_loader)
        if main:
            save_evaluation(cfg, result, evaluated, val_loader, progress.global_step)
            m = result.metrics
            print(f"final evaluation: val NLL {m['val/nll_iwae']:.3f} nats (IWAE k={cfg.loss.eval_iwae_k}), "
                  f"{m['val/bpd']:.4f} bits/dim, ELBO {m['val/elbo']:.3f}; saved in {output_dir}", flush=True)
            journal.log_metrics(finite(m), step=progress.global_step)
            if cfg.tracking.finalize == "register":
                journal.publish(output_dir)
    if main:
        published = journal.close("FINISHED") or not journal.publish_pending
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if not published:
        raise TrainingError(
            f"the trained model is not registered: MLflow at {journal.uri} did not answer. The model and its "
            f"evaluation are kept in {output_dir}; register them and finish the run with: {journal.sync_command()}"
        )
