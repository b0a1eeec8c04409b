"""Training: the trainer and everything one run needs to step, checkpoint, resume and finish.

- `trainer`: `Trainer` (build, step, validate) and `train()`, the loop that reads top to bottom;
- `checkpointing` and `checkpoint`: saving and resuming, and the checkpoint layout (meta.json last, JSON RNG
  states, nothing pickled); `preemption`: SIGTERM/SIGINT finish the step, checkpoint, exit 75;
- `step_guard`: non-finite steps skipped, on the device or synchronously; `optim`, `schedule`, `graphs`;
- `data`: the loaders of a rank; `distributed`: what ranks agree on; `trained`: the model a run trains and the
  model a checkpoint holds; `finalize`: the post-training path up to evaluation.json (the registry takes over).

Owns the run directory's contents. Imports config, models, objectives, tracking (the journal) and `pipeline`'s
public API; never imports the registry or launch code: publishing is handed in as a `Publisher` by the entry point
(vae/train.py). No re-exports here, so `training.preemption` and `training.checkpoint` import without accelerate.
"""
