"""Which devices this machine has for a launch, and a free rendezvous port (two launches on the default collide)."""

from __future__ import annotations

import os
import socket


def free_port() -> int:
    """A TCP port free on loopback now (the kernel picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def has_gpu() -> bool:
    import torch  # heavy (~2 s): the flow builds launch commands in a process that never trains

    return torch.cuda.is_available()


def missing_gpu(env: dict[str, str] | None = None) -> str | None:
    """Why this rank must not train: the launcher was given GPUs (an Accelerate config's gpu_ids, or bf16/fp16)
    but this machine has none, so it would train silently on the CPU, in bf16 about 7x slower than in fp32.
    None when there is a GPU, or the launch asked for the CPU (--cpu, use_cpu: true, ACCELERATE_USE_CPU=1)."""
    env = os.environ if env is None else env
    if env.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or has_gpu():
        return None
    asked = []
    devices = env.get("CUDA_VISIBLE_DEVICES")
    if devices and env.get("ACCELERATE_USE_CPU") is not None:  # set by the launcher from the config's gpu_ids
        asked.append(f"GPU {devices}")
    if env.get("ACCELERATE_MIXED_PRECISION", "no") in ("bf16", "fp16"):
        asked.append(f"{env['ACCELERATE_MIXED_PRECISION']} mixed precision")
    if not asked:
        return None
    return (f"this launch asks for {' and '.join(asked)} (an Accelerate config for GPUs, e.g. "
            "infra/accelerate/1gpu.yaml) but this machine has no CUDA device; it would train on the CPU. On a CPU "
            "machine launch without --config_file (`accelerate launch vae/train.py ...`) or add --cpu "
            "--mixed_precision no")


