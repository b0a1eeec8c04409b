"""CUDA graphs for the compiled training step: `torch.compile(mode="reduce-overhead")` records the forward and
backward kernels once and replays them as one launch per step, which removes the per-kernel launch cost that is
exposed when the step is short (23 ms at batch 16,384 on an H100, bench/LOG.md). Off by default; on a CPU there
is nothing to capture, so asking for it there is refused rather than silently ignored."""

from __future__ import annotations

import torch


def compile_options(cuda_graphs: bool, device: torch.device | str,
                    error: type[Exception] = ValueError) -> dict[str, str]:
    """`nn.Module.compile` options for train.cuda_graphs on `device`: {} (inductor's default mode) when off, CUDA
    graph capture when on and the device is a GPU; anywhere else `error` (the trainer's TrainingError), naming
    the fix."""
    if not cuda_graphs:
        return {}
    device = torch.device(device)
    if device.type != "cuda":
        raise error(f"train.cuda_graphs captures CUDA kernels, but this run trains on {device.type!r}: "
                         "set --train.cuda_graphs false (train.compile alone compiles for this device)")
    return {"mode": "reduce-overhead"}
