"""The `accelerate launch` command line that runs vae/train.py, and the output directory a launch writes to."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from vae.config import parse_args
from vae.launch.devices import free_port, has_gpu

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "train.py"


def accelerate_command(
    config_path: str | os.PathLike,
    num_processes: int = 1,
    accelerate_config: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """argv and extra environment that run vae/train.py on `num_processes` ranks of this machine, supervised.

    With an Accelerate YAML (infra/accelerate/*.yaml) the hardware topology comes from it; otherwise GPUs are
    used when present and CPU ranks (gloo) when not. The script is told the world size to expect.
    """
    argv = [sys.executable, "-m", "vae.launch"]
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


def output_dir_of(accelerate_args: list[str]) -> Path:
    """The run's output directory, from the launch arguments parsed as `accelerate launch` and vae/train.py do.

    A bad config stops here with the script's own message (status 2), before any rank starts.
    """
    # heavy (accelerate imports torch): only the supervisor parses launch arguments, the flow never does
    from accelerate.commands.launch import launch_command_parser

    args = launch_command_parser().parse_args(accelerate_args)
    if args.module or Path(args.training_script).parts[-2:] != TRAIN_SCRIPT.parts[-2:]:
        raise SystemExit(f"python -m vae.launch runs {TRAIN_SCRIPT.parent.name}/{TRAIN_SCRIPT.name} only, got "
                         f"{args.training_script!r}: give the arguments of accelerate launch, e.g. "
                         "python -m vae.launch --num_processes 2 vae/train.py --config infra/configs/digits.yaml")
    return Path(parse_args(args.training_script_args).train.output_dir)


