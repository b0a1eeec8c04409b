"""Training entry point: parse, build, train, close.

    accelerate launch vae/train.py --config infra/configs/digits.yaml [--section.field VALUE ...]
    python -m vae.launch vae/train.py ...   # the same, supervised: signal it, and 75 means preempted (vae/launch.py)
"""

import argparse
import sys
from pathlib import Path

# Run as a script, Python puts vae/ itself first on sys.path, where config.py, plots.py and friends would
# shadow any top-level module of the same name for every library imported after this line.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from vae.config import ConfigError, RunConfig, field_help, load_config  # noqa: E402


def parse(argv: list[str] | None = None) -> RunConfig:
    """The run config from `--config PRESET [--section.field VALUE ...]`; a bad one exits with status 2.

    vae.launch parses the script's arguments with this too, to know the output directory it supervises.
    """
    parser = argparse.ArgumentParser(
        prog="accelerate launch vae/train.py",
        description="Train a VAE on a shard directory; any config field can be overridden as --section.field VALUE.",
        epilog="config fields:\n" + field_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, help="YAML preset, e.g. infra/configs/digits.yaml")
    args, overrides = parser.parse_known_args(argv)
    try:
        return load_config(args.config, overrides)
    except ConfigError as err:
        parser.error(str(err))


def main(argv: list[str] | None = None) -> None:
    cfg = parse(argv)
    from vae.launch import missing_gpu

    if (why := missing_gpu()) is not None:  # before anything is built: the first line the user sees
        print(f"error: {why}", file=sys.stderr)
        raise SystemExit(1)

    from pipeline import ShardFormatError
    from vae.trainer import TrainingError, train  # heavy imports only after the config is known to be valid

    try:
        train(cfg)
    except (TrainingError, ShardFormatError) as err:  # the message names the problem and the fix
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
