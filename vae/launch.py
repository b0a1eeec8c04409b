"""The `accelerate launch` command line for vae/train.py, shared by the Prefect flow and the tests.

Facts measured here (DESIGN.md): `--cpu --num_processes 2` starts ONE process, and `--multi_gpu` on a CPU
host without ACCELERATE_USE_CPU=1 starts ranks that each believe they are alone. Two launches on the
default rendezvous port collide, so a free port is always chosen.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

TRAIN_SCRIPT = Path(__file__).with_name("train.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def accelerate_command(
    config_path: str | os.PathLike,
    num_processes: int = 1,
    accelerate_config: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """argv and extra environment that run vae/train.py on `num_processes` ranks of this machine.

    With an Accelerate YAML (infra/accelerate/*.yaml) the hardware topology comes from it; otherwise GPUs are
    used when present and CPU ranks (gloo) when not. The script is told the world size to expect.
    """
    argv = [sys.executable, "-m", "accelerate.commands.launch"]
    env: dict[str, str] = {}
    if accelerate_config is not None:
        argv += ["--config_file", str(accelerate_config)]
    else:
        argv += ["--num_machines", "1", "--num_processes", str(num_processes), "--dynamo_backend", "no"]
        if num_processes > 1:
            argv += ["--multi_gpu", "--main_process_port", str(free_port())]
            if not has_gpu():
                env["ACCELERATE_USE_CPU"] = "1"
                argv += ["--mixed_precision", "no"]
        elif not has_gpu():
            argv += ["--cpu", "--mixed_precision", "no"]
    argv += [str(TRAIN_SCRIPT), "--config", str(config_path), "--train.expected_world_size", str(num_processes)]
    return argv + list(overrides or []), env
