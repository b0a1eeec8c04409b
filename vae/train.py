"""Training entry point: parse, build, train, close.

    accelerate launch vae/train.py --config infra/configs/digits.yaml [--section.field VALUE ...]
    python -m vae.launch vae/train.py ...   # the same, supervised: signal it, and 75 means preempted (vae/launch/)

The entry composes the layers: the trainer (vae/training) publishes through the registry's `publish_run`, handed
in here, so neither training nor tracking imports the registry.
"""

import sys
from pathlib import Path

# Run as a script, Python puts vae/ itself first on sys.path, where its packages (config/, training/, ...) would
# shadow any top-level module of the same name for every library imported after this line.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from pipeline import ShardFormatError  # noqa: E402
from vae.config import ConfigError, parse_args  # noqa: E402
from vae.launch.devices import missing_gpu  # noqa: E402
from vae.registry.publish import publish_run  # noqa: E402
from vae.training.errors import TrainingError  # noqa: E402
from vae.training.trainer import train  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    if (why := missing_gpu()) is not None:  # before anything is built: the first line the user sees
        print(f"error: {why}", file=sys.stderr)
        raise SystemExit(1)
    try:
        train(cfg, publisher=publish_run)
    except (TrainingError, ShardFormatError, ConfigError) as err:  # the message names the problem and the fix
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
