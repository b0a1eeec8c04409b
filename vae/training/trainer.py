"""Training, decomposed as torchtitan does: a `Trainer` builds everything and knows how to step, validate, save and
load; `train()` is the loop that calls it, top to bottom: build, resume, then per epoch train, validate (the
metrics, and the objective's reconstruction grid as an image at that step), checkpoint, and at the end the
post-training path (vae/training/finalize.py).

What is minimised is behind one seam, the run's `Objective` (vae/objectives): it names the models it trains and
backpropagates its losses; the trainer treats every model alike. Accelerate does devices, DDP, mixed precision,
gradient accumulation and save/load of the models and optimisers. The data loader is ours (pipeline.ShardLoader,
one slice per rank) and deliberately not passed to `accelerator.prepare()`. Rank 0 alone talks to MLflow, through
a journal in the output directory (vae/tracking/journal.py): a tracking server that stops and comes back costs no
metric and stalls no step. SIGTERM or SIGINT finishes the current step, writes a checkpoint and exits with
PREEMPTED_EXIT, so an orchestrator can retry with --train.resume true and lose nothing. Corrupt shards stop the
run or are skipped per data.on_corrupt_shard (see pipeline.loader). The model spec goes into every checkpoint's
meta.json (vae/training/trained.py): what comes after training rebuilds the model from there.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from vae.config import RunConfig, dump
from vae.models.spec import build_from_spec
from vae.objectives import build_objective
from vae.objectives.inputs import to_input
from vae.tracking.journal import Publisher, open_journal
from vae.training import checkpoint
from vae.training.checkpointing import Checkpointing
from vae.training.data import build_loaders
from vae.training.distributed import resolve_precision, skipped_shards
from vae.training.errors import TrainingError
from vae.training.finalize import finalize
from vae.training.graphs import compile_options
from vae.training.optim import Lamb, MuonAdamW, step_kernels
from vae.training.preemption import PREEMPTED_EXIT, Preemption
from vae.training.schedule import lr_at, scaled_lr
from vae.training.step_guard import DeviceStepGuard, StepGuard, masked, masked_step, nonfinite_flags
from vae.training.trained import resolve_model, spec_of

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "lamb": Lamb, "muon": MuonAdamW}
GRIDS_DIR = "validation"  # in output_dir: the objective's grid of each validation, step-<step>.png, kept for MLflow
GRID_KEY = "val/reconstructions"  # the image key in MLflow (vae/tracking/metrics.py: IMAGES)



class Trainer(Checkpointing):
    """One run's models, optimisers, loaders, EMA and progress, and the operations the loop calls on them."""

    # ---- build: models, optimisers, loaders, and everything a checkpoint must hold

    def __init__(self, cfg: RunConfig, preemption: Preemption, publisher: Publisher | None = None) -> None:
        self.cfg, self.preemption, self.publisher = cfg, preemption, publisher
        self.accelerator = Accelerator(mixed_precision=resolve_precision(cfg),
                                       gradient_accumulation_steps=cfg.train.gradient_accumulation_steps)
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.main, self.device = self.accelerator.is_main_process, self.accelerator.device
        self.output_dir = Path(cfg.train.output_dir)
        if cfg.tracking.finalize == "register" and publisher is None:
            raise TrainingError("tracking.finalize register needs a publisher to register the model: call "
                                "train(cfg, publisher=vae.registry.publish.publish_run) as vae/train.py does, or "
                                "set --tracking.finalize evaluate")
        self.check_launch()
        set_seed(cfg.train.seed)
        self.spec = spec_of(cfg)  # the one read of the shard index for the model; meta.json keeps it from here on
        self.objective = build_objective(cfg)
        self.build_models(build_from_spec(self.spec))
        self.train_loader, self.val_loader = build_loaders(cfg, self.rank, self.world, device=self.device)
        self.build_step_check()
        # ---- schedule: pure functions of the optimiser step
        self.accumulation = cfg.train.gradient_accumulation_steps
        self.global_batch = cfg.train.batch_size * self.world * self.accumulation
        self.peak_lr = scaled_lr(cfg.optim.lr, self.global_batch, cfg.optim.reference_batch, cfg.optim.lr_scaling)
        self.steps_per_epoch = len(self.train_loader) // self.accumulation
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        self.run_id, self.journal = None, None
        self.grid_inputs: torch.Tensor | None = None  # rank 0: the validation images of every grid, read once
        self.lr, self.grad_norms = 0.0, {}
        self._reset_running()

    def check_launch(self) -> None:
        """Refuse a launch with another world size than expected, or a fresh run over an earlier one's checkpoints."""
        expected = self.cfg.train.expected_world_size
        if expected is not None and expected != self.world:
            raise TrainingError(
                f"expected {expected} processes but the launcher started {self.world}. On a CPU host, two real ranks "
                "need ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 (--cpu starts only one)"
            )
        if not self.cfg.train.resume and checkpoint.latest(self.output_dir) is not None:
            raise TrainingError(
                f"{self.output_dir} already holds checkpoints of an earlier run; pass --train.resume true to continue "
                "it or choose another --train.output_dir"
            )

    def build_models(self, model: torch.nn.Module) -> None:
        """The objective's models (the architecture's first) with their optimisers, prepared by Accelerate, and
        their EMAs when kept."""
        cfg, accelerator = self.cfg, self.accelerator
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if cfg.train.compile:
            # in place: state_dict keys stay as they are, checkpoints stay portable
            model.compile(**compile_options(cfg.train.cuda_graphs, self.device, TrainingError))
        models = self.objective.models(model)
        if len(models) > 1 and accelerator.mixed_precision == "fp16":
            # Accelerate's optimiser wrapper calls scaler.update() after each optimiser's step, which forgets that
            # the others' gradients were unscaled already: the second would be unscaled twice.
            raise TrainingError(f"train.mixed_precision fp16 with {len(models)} models ({', '.join(models)}) would "
                                "unscale the second one's gradients twice; use --train.mixed_precision bf16 (or no)")
        optimizers = {name: self.objective.optimizer(name, m) or self.build_optimizer(m) for name, m in models.items()}
        prepared = accelerator.prepare(*models.values(), *optimizers.values())
        self.models = dict(zip(models, prepared[: len(models)], strict=True))
        self.optimizers = dict(zip(optimizers, prepared[len(models) :], strict=True))
        self.emas: dict[str, AveragedModel] = {}
        if cfg.train.ema_decay is not None:
            self.emas = {name: AveragedModel(accelerator.unwrap_model(m),
                                             multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema_decay))
                         for name, m in self.models.items()}

    def build_step_check(self) -> None:
        """Progress and the non-finite step guard, synchronous or on the device (vae/training/step_guard.py)."""
        # Not registered with Accelerate, which would pickle them: `save` and `load` keep them in JSON.
        self.progress, self.guard = checkpoint.TrainProgress(), StepGuard(self.cfg.train.max_nonfinite_steps)
        # fp16's scaler skips overflowing steps itself and must see them, so it keeps the synchronous check
        self.fp16_scaler = self.accelerator.scaler is not None
        deferred = self.cfg.train.deferred_step_check
        self.deferred = (self.device.type == "cuda" if deferred is None else deferred) and not self.fp16_scaler
        if self.deferred:  # flags read one step late: no host sync per optimiser step
            self.guard = DeviceStepGuard(self.guard)
        self.stop_requested = False  # a rank was asked to stop (preemption); with `deferred`, known a step late

    def build_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        o = self.cfg.optim
        return OPTIMIZERS[o.name](model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay,
                                  **step_kernels(o.name, self.device))

    @property
    def model(self) -> torch.nn.Module:
        """The architecture's model as evaluated, plotted and exported: its EMA when kept, unwrapped."""
        return self.emas["model"].module if self.emas else self.accelerator.unwrap_model(self.models["model"])

    # ---- start: resume from the newest checkpoint that loads on every rank, or from scratch; open the journal

    def start(self) -> None:
        cfg, main = self.cfg, self.main
        if cfg.train.resume and checkpoint.latest(self.output_dir) is not None:
            path = self.resume(checkpoint.complete_checkpoints(self.output_dir))
            self.run_id = checkpoint.read_meta(path).get("mlflow_run_id")
            if main:
                print(f"resuming from {path} (epoch {self.progress.epoch}, step {self.progress.global_step}, "
                      f"loader at batch {self.train_loader.position} of epoch {self.train_loader.epoch + 1})",
                      flush=True)
        elif cfg.train.resume and main:
            print(f"no complete checkpoint in {self.output_dir}; starting from scratch", flush=True)
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(dump(cfg))
            # sends what a killed run left; registering goes through the publisher the entry point handed in
            self.journal = open_journal(cfg, self.output_dir, self.run_id, self.publisher)
            self.run_id = self.journal.run_id

    # ---- train: one optimiser step per `accumulation` micro-batches

    def batches(self, epoch: int) -> Iterator[torch.Tensor]:
        """Model inputs of one epoch (the rest of one, after a mid-epoch resume), with a progress bar on rank 0."""
        for m in self.models.values():
            m.train()
        self.train_loader.set_epoch(epoch)
        self._reset_running()
        self.grad_norms = {}
        bar = tqdm(total=len(self.train_loader), initial=self.train_loader.position,
                   desc=f"epoch {epoch + 1}/{self.cfg.train.epochs}", disable=not self.main)
        self.bar = bar
        for batch in self.train_loader:
            yield to_input(batch.images.to(self.device, non_blocking=True), self.cfg)
            bar.update(1)
        bar.close()

    def step(self, x: torch.Tensor) -> bool:
        """Forward and backward of every loss on micro-batch `x`; at a gradient-sync point, clip, check, step every
        optimiser and the EMA. Returns whether any rank was asked to stop (preemption)."""
        accelerator, progress = self.accelerator, self.progress
        self.lr = lr_at(progress.global_step, self.total_steps, self.peak_lr, self.cfg.optim.warmup_steps,
                        self.cfg.optim.schedule, self.cfg.optim.min_lr_ratio)
        for name, optimizer in self.optimizers.items():
            for group in optimizer.param_groups:
                group["lr"] = self.lr * self.objective.lr_scale(name)
        with accelerator.accumulate(*self.models.values()):
            sums = self.objective.step(self.models, x, progress.global_step, accelerator.backward)
            if accelerator.sync_gradients:
                # Accelerate's clip_grad_norm_ unscales every optimiser's gradients (fp16), which may happen once per
                # step: unscale once, then clip each model as it would (DDP: plain torch clipping).
                accelerator.unscale_gradients()
                clip = self.cfg.optim.grad_clip or math.inf
                self.grad_norms = {name: torch.nn.utils.clip_grad_norm_(list(m.parameters()), clip)
                                   for name, m in self.models.items()}
                if self.deferred:
                    self.step_on_device()
                else:
                    self.step_synchronously()
                progress.global_step += 1
            for optimizer in self.optimizers.values():
                optimizer.zero_grad(set_to_none=True)
        self.running += sums.double()
        self.seen += len(x)
        return self.stop_requested

    def step_synchronously(self) -> None:
        """One host sync: whether to step (gradients finite on every rank) and whether any rank must stop."""
        accelerator = self.accelerator
        nonfinite = torch.stack([~torch.isfinite(n) for n in self.grad_norms.values()]).any().float()
        flags = torch.stack([nonfinite, torch.tensor(float(self.preemption.requested), device=self.device)])
        nonfinite, stop = (accelerator.reduce(flags, "sum") if self.world > 1 else flags).gt(0).tolist()
        if self.fp16_scaler or not nonfinite:
            for optimizer in self.optimizers.values():
                optimizer.step()
        skipped = accelerator.optimizer_step_was_skipped if self.fp16_scaler else nonfinite
        self.guard.record(skipped, self.progress.global_step)
        if not skipped:
            for name, ema in self.emas.items():
                ema.update_parameters(accelerator.unwrap_model(self.models[name]))
        self.stop_requested = self.stop_requested or bool(stop)

    def step_on_device(self) -> None:
        """The same skip decided on the device: every optimiser and EMA changes nothing where any model's gradients
        are not finite on any rank; the flags reach the host one step late (`check`)."""
        accelerator = self.accelerator
        # a sum of norms is non-finite exactly when one of them is
        flags = nonfinite_flags(torch.stack(list(self.grad_norms.values())).sum(), self.preemption.requested)
        if self.world > 1:
            flags = accelerator.reduce(flags, "sum")  # an all-reduce on the device: no host sync
        bad = flags[0]
        for optimizer in self.optimizers.values():
            masked_step(optimizer, bad)
        for name, ema in self.emas.items():
            module = accelerator.unwrap_model(self.models[name])
            masked(bad, lambda ema=ema, module=module: ema.update_parameters(module),
                   lambda ema=ema: [*ema.parameters(), *ema.buffers()])
        self.stop_requested = self.guard.advance(flags, self.progress.global_step) or self.stop_requested

    def check(self) -> bool:
        """Read the last step's deferred flags (counting a skip, raising at the limit); whether to stop."""
        if self.deferred:
            self.stop_requested = self.guard.flush() or self.stop_requested
        return self.stop_requested

    def log_due(self) -> bool:
        """Every train.log_every optimiser steps, and at the epoch's last batch: the same answer on every rank."""
        last = self.train_loader.position == len(self.train_loader)
        return (self.accelerator.sync_gradients and self.progress.global_step % self.cfg.train.log_every == 0) or last

    def log_training(self) -> None:
        """Means since the last log (a host sync and an all-reduce: every rank reaches this at the same step)."""
        self.check()  # the skipped-step count below includes the last step
        totals = self.accelerator.reduce(torch.cat([self.running, self.running.new_tensor([self.seen])]), "sum")
        *sums, n = totals.tolist()
        metrics = {f"train/{name}": s / n for name, s in zip(self.objective.metrics, sums, strict=True)}
        metrics.update({"train/lr": self.lr, "train/skipped_steps": self.guard.total,
                        "train/samples_per_s": n / (time.perf_counter() - self.tick)})
        for name, norm in self.grad_norms.items():
            metrics["train/grad_norm" if name == "model" else f"train/grad_norm_{name}"] = float(norm)
        if self.main:
            self.journal.log_metrics(metrics, step=self.progress.global_step)
            self.bar.set_postfix(loss=f"{metrics.get('train/loss', math.nan):.2f}",
                                 img_s=f"{metrics['train/samples_per_s']:.0f}")
        self._reset_running()

    def _reset_running(self) -> None:
        # the objective's metric sums on the device: no per-step host sync
        self.running = torch.zeros(len(self.objective.metrics), dtype=torch.float64, device=self.device)
        self.seen, self.tick = 0, time.perf_counter()

    # ---- validate (the EMA weights when kept): each rank its exact slice, one all-reduce of the sums

    def validate(self) -> dict[str, float]:
        sums = self.objective.validation_sums(self.model, (b.images for b in self.val_loader), self.device)
        val = self.objective.validation_metrics(self.accelerator.reduce(sums, "sum"))
        skipped = skipped_shards(self.accelerator, {"train": self.train_loader, "val": self.val_loader})
        if self.main:
            self.journal.log_metrics({**val, "train/skipped_shards": len(skipped["train"]),
                                      "val/skipped_shards": len(skipped["val"])}, step=self.progress.global_step)
            if skipped["train"] or skipped["val"]:
                print(f"warning: skipped corrupt shards (data.on_corrupt_shard skip): train {skipped['train']}, "
                      f"val {skipped['val']}; check them with `vaepipe verify {self.cfg.shard_dir}` and re-ingest",
                      flush=True)
            print(f"epoch {self.progress.epoch + 1}: {self.objective.summary(val)}", flush=True)
            if self.objective.grid_images:
                self.log_grid()
        return val

    def log_grid(self) -> None:
        """Rank 0: the objective's grid of the first validation images, written into the output directory and
        journaled as an image at this step, so MLflow shows the reconstructions improve."""
        if self.grid_inputs is None:
            taken = []
            for batch in self.val_loader:  # the first images of rank 0's slice, in a fixed order
                taken.append(to_input(batch.images, self.cfg).cpu())
                if sum(len(x) for x in taken) >= self.objective.grid_images:
                    break
            self.grid_inputs = torch.cat(taken)[: self.objective.grid_images]
        step = self.progress.global_step
        path = self.output_dir / GRIDS_DIR / f"step-{step:09d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.objective.validation_grid(self.model, self.grid_inputs.to(self.device), path)
        self.journal.log_image(path, GRID_KEY, step)

    # ---- stop: preempted mid-epoch, or finished

    def preempted(self) -> None:
        """Checkpoint and exit with PREEMPTED_EXIT (the orchestrator retries with --train.resume true)."""
        path = self.save("preempted")
        if self.main:
            print(f"preempted: wrote {path}; resume with --train.resume true", flush=True)
            self.journal.close("KILLED")
        raise SystemExit(PREEMPTED_EXIT)

    def finish(self) -> None:
        """The post-training path (evaluate on these devices, plot, log, register per tracking.finalize), then
        the run's final status; a registration MLflow did not take stops with the command that completes it."""
        finalize(self.cfg, self.accelerator, self.model, self.val_loader, self.journal, self.progress.global_step,
                 self.objective)
        published = True
        if self.main:
            published = self.journal.close("FINISHED") or not self.journal.publish_pending
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        if not published:
            raise TrainingError(
                f"the trained model is not registered: MLflow at {self.journal.uri} did not answer. The model and its "
                f"evaluation are kept in {self.output_dir}; register them and finish the run with: "
                f"{self.journal.sync_command()}"
            )


def train(cfg: RunConfig, publisher: Publisher | None = None) -> None:
    """Build, resume, train epoch by epoch (validate and checkpoint after each), then the post-training path;
    with tracking.finalize "register", `publisher` registers the model (vae/train.py passes the registry's)."""
    preemption = Preemption()  # first: a signal during start-up must not kill the process half-way either
    trainer = Trainer(resolve_model(cfg), preemption, publisher)
    trainer.start()
    for epoch in range(trainer.progress.epoch, cfg.train.epochs):
        for x in trainer.batches(epoch):
            trainer.step(x)
            if trainer.log_due():  # always at the epoch's last batch, which also reads a deferred last step
                trainer.log_training()
            if trainer.stop_requested:  # after the log above: a preempted step that is due to be logged is logged
                trainer.preempted()
        val = trainer.validate()
        trainer.progress.epoch = epoch + 1
        trainer.save("end of epoch", val)
    trainer.finish()
