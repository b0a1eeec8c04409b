"""The trainer's checkpoint side: resume from the newest checkpoint that loads on every rank, and save one.

A checkpoint holds everything needed to resume (vae/training/checkpoint.py has the layout): the models and
optimisers through Accelerate (safetensors, and torch.load with weights_only for optimiser state), the EMA weights,
progress, the loader's position and the RNG states in JSON, and meta.json, written last by rank 0, which marks it
complete. `Checkpointing` is a base of `Trainer` and works on its state (models, optimisers, emas, progress,
guard, train_loader, accelerator).
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from vae.training import checkpoint
from vae.training.checkpoint import ema_file, no_space_error, refuse_changes
from vae.training.distributed import param_checksum
from vae.training.errors import TrainingError

# What loading a damaged or planted checkpoint file raises: our own checks, safetensors, torch.load's zip reader
# and its weights_only unpickler, a state of the wrong shape.
LOAD_ERRORS = (checkpoint.CheckpointError, SafetensorError, pickle.UnpicklingError, OSError, ValueError, KeyError,
               TypeError, RuntimeError)


class Checkpointing:
    """Resume and save, for `Trainer` (which sets every attribute used here)."""

    # ---- resume: the newest checkpoint that loads on every rank

    def resume(self, candidates: list[Path]) -> Path:
        """Load the newest checkpoint that loads on every rank; warn about and set aside the newer ones."""
        skipped = []
        for path in reversed(candidates):
            try:
                meta = checkpoint.read_json(path / checkpoint.META)
            except checkpoint.CheckpointError as err:
                meta, error = None, str(err)
            if meta is not None:
                # another config: refused, never a fallback
                refuse_changes(self.cfg.model_dump(mode="json"), self.spec, meta, path, self.world, self.global_batch)
                try:
                    self.load(path, meta)
                    error = None
                except LOAD_ERRORS as err:
                    error = f"{type(err).__name__}: {err}"
            if error is not None:
                print(f"warning: rank {self.rank}: checkpoint {path} cannot be loaded: {error}", flush=True)
            # every rank must resume from the same checkpoint: one that fails on any rank is skipped by all
            failed = torch.tensor([float(error is not None)], device=self.device)
            if self.accelerator.reduce(failed, "sum").item() == 0:
                if self.main:
                    for bad, why in skipped:
                        print(f"warning: skipped checkpoint {bad} ({why}); moved it to {checkpoint.set_aside(bad)}, "
                              f"resuming from the newest one that loads, {path.name}", flush=True)
                self.accelerator.wait_for_everyone()
                return path
            skipped.append((path, error or "another rank could not load it"))
        raise TrainingError(
            f"no checkpoint in {checkpoint.checkpoint_root(self.output_dir)} loads: "
            + "; ".join(f"{p.name}: {why}" for p, why in skipped)
            + ". Move them aside to start over in this directory, or choose another --train.output_dir"
        )

    def load(self, path: Path, meta: dict) -> None:
        """Every state in `path`, from safe formats only; raises one of LOAD_ERRORS, naming the file."""
        checkpoint.verify(path, meta, self.rank)  # nothing but our files, each of its recorded size
        state = checkpoint.read_json(path / checkpoint.TRAIN_STATE)
        rng = checkpoint.read_json(path / f"rng-{self.rank}.json")
        ema_weights = {name: checkpoint.read_tensors(path / ema_file(name)) for name in self.emas}
        # models from safetensors; optimisers (and fp16 scaler) through torch.load(weights_only=True). Nothing is
        # registered, so no custom_checkpoint pickle is read; the RNG pickle it looks for is not there.
        try:
            self.accelerator.load_state(str(path), load_kwargs={"weights_only": True})
        except LOAD_ERRORS as err:
            raise checkpoint.CheckpointError(checkpoint.blame(path, err)) from err
        counts = state.get("ema_n_averaged_by_model", {"model": state["ema_n_averaged"]})
        for name, ema in self.emas.items():
            ema.module.load_state_dict(ema_weights[name])
            ema.n_averaged.fill_(int(counts[name]))
        self.progress.load_state_dict(state["progress"])
        self.train_loader.load_state_dict(state["loader"])
        self.guard.load_state_dict(state["step_guard"])
        self.accelerator.step = int(state["accelerator_step"])  # where gradient accumulation stands
        checkpoint.set_rng_state(rng)

    # ---- save: state from every rank, then EMA weights and meta.json (last) from rank 0

    def state_bytes(self) -> int:
        """Bytes of the tensors a checkpoint holds: what a first save needs at least."""
        tensors = [t for m in self.models.values() for t in m.state_dict().values()]
        tensors += [v for o in self.optimizers.values() for s in o.state.values() for v in s.values()]
        tensors += [t for ema in self.emas.values() for t in ema.module.state_dict().values()]
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))

    def save(self, reason: str, val: dict[str, float] | None = None) -> Path:
        """Write the checkpoint of this step (every rank), meta.json last, then prune the older ones."""
        self.check()  # a deferred last step is counted before the guard's state is written
        checksums = self.accelerator.gather(param_checksum(list(self.models.values())).reshape(1)).tolist()
        if len(set(checksums)) != 1:
            raise TrainingError(f"the ranks' weights diverged by step {self.progress.global_step}: checksums "
                                f"{checksums}")
        target = checkpoint.step_dir(self.output_dir, self.progress.global_step)
        previous = checkpoint.latest(self.output_dir)
        path = self.empty_dir_for(target)
        try:
            self.write_state(path)
            self.accelerator.wait_for_everyone()  # every rank's files are in place before rank 0 marks it complete
            if self.main:
                checkpoint.write_meta(path, self.meta(reason, val, checksums))
        except (OSError, RuntimeError, SafetensorError) as err:
            needed = checkpoint.size(previous) if previous is not None else self.state_bytes()
            full = no_space_error(err, self.output_dir, needed)
            if self.main and not (path / checkpoint.META).is_file():
                shutil.rmtree(path, ignore_errors=True)  # our incomplete write: its space goes back to the disk
            if full is not None:
                raise full from err
            raise
        if self.main:
            if path != target:
                checkpoint.replace(target, path)
            checkpoint.prune(self.output_dir, self.cfg.train.keep_checkpoints)  # only now that the new one is complete
        self.accelerator.wait_for_everyone()
        return target

    def empty_dir_for(self, target: Path) -> Path:
        """Where this save writes, emptied by rank 0 once every rank has chosen it. A complete checkpoint at this
        step (a preemption at the epoch's last batch, resumed) is replaced only once the new one is complete: it
        is written beside it first. An incomplete one is our own failed save's."""
        path = target.with_name(f".new-{target.name}") if (target / checkpoint.META).is_file() else target
        self.accelerator.wait_for_everyone()
        if self.main and path.exists():
            shutil.rmtree(path)
        self.accelerator.wait_for_everyone()
        return path

    def write_state(self, path: Path) -> None:
        """Every rank: its models, optimisers (Accelerate) and RNG states (JSON); rank 0: EMA weights and progress."""
        self.accelerator.save_state(str(path))  # models (safetensors), optimisers and fp16 scaler (torch.save)
        # Accelerate always pickles the RNG states too: we keep them in JSON, so that no checkpoint holds a pickle
        (path / f"random_states_{self.rank}.pkl").unlink()
        checkpoint.write_json(path / f"rng-{self.rank}.json", checkpoint.rng_state())
        if not self.main:
            return
        for name, ema in self.emas.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in ema.module.state_dict().items()},
                      path / ema_file(name))
        counts = {name: int(ema.n_averaged) for name, ema in self.emas.items()}
        checkpoint.write_json(path / checkpoint.TRAIN_STATE, {
            "progress": self.progress.state_dict(), "loader": self.train_loader.state_dict(),
            "step_guard": self.guard.state_dict(), "accelerator_step": self.accelerator.step,
            "ema_n_averaged": counts.get("model", 0), "ema_n_averaged_by_model": counts,
        })

    def meta(self, reason: str, val: dict[str, float] | None, checksums: list[float]) -> dict:
        """meta.json: progress, why it was written, the run's shape and the resolved config and model spec."""
        return {
            **self.progress.state_dict(), "reason": reason, "loader": self.train_loader.state_dict(),
            "steps_per_epoch": self.steps_per_epoch, "world_size": self.world, "global_batch": self.global_batch,
            "rank_param_checksums": checksums, "skipped_steps": self.guard.total, "mlflow_run_id": self.run_id,
            "val": val, "model_spec": self.spec, "models": list(self.models),
            "config": self.cfg.model_dump(mode="json"),
        }
