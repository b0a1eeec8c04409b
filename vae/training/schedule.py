"""Learning-rate rules as pure functions of the step (nanochat style): nothing to save but the step itself."""

from __future__ import annotations

import math
from typing import Literal

ScalingRule = Literal["none", "linear", "sqrt"]
Schedule = Literal["constant", "cosine"]


def scaled_lr(lr: float, global_batch: int, reference_batch: int, rule: ScalingRule) -> float:
    """The peak learning rate for `global_batch`, given `lr` tuned at `reference_batch`.

    linear (Goyal et al.): lr * B / B_ref, for SGD-like updates; sqrt: lr * sqrt(B / B_ref), the usual rule for
    Adam, whose per-parameter normalisation already absorbs part of the gradient-noise change.
    """
    ratio = global_batch / reference_batch
    return {"none": lr, "linear": lr * ratio, "sqrt": lr * math.sqrt(ratio)}[rule]


def lr_at(step: int, total_steps: int, peak: float, warmup_steps: int, schedule: Schedule, min_ratio: float) -> float:
    """Learning rate for optimiser step `step` (0-based): linear warm-up to `peak`, then constant or cosine to
    `min_ratio * peak` at `total_steps`."""
    if warmup_steps and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))
