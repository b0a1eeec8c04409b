"""python -m vae.tracking JOURNAL RUN_ID [--uri URI]: the sync command a journal prints when MLflow did not answer.

An entry point, so it composes the layers: the journal (tracking) with the registry's `publish_run`, which a
journaled registration needs. Library modules of vae.tracking never import the registry.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vae.registry.publish import publish_run
from vae.tracking.journal import JOURNAL_DIR, short, sync_journal


def main(argv: list[str] | None = None) -> None:
    """python -m vae.tracking JOURNAL RUN_ID [--uri URI]: send a journal's unsent entries (metrics, the model's
    registration when training journaled one, the run's final status)."""
    parser = argparse.ArgumentParser(prog="python -m vae.tracking", description=main.__doc__)
    parser.add_argument("journal", type=Path, help=f"<output_dir>/{JOURNAL_DIR}/<run id>.jsonl")
    parser.add_argument("run_id")
    parser.add_argument("--uri", help="tracking URI (default: MLFLOW_TRACKING_URI, else the embedded store)")
    args = parser.parse_args(argv)
    try:
        count = sync_journal(args.journal, args.run_id, args.uri, publisher=publish_run)
    except Exception as err:  # not swallowed: one line naming what failed, and a failing exit status
        print(f"error: {short(err)}; nothing is lost, run the same command again once MLflow answers",
              file=sys.stderr)
        raise SystemExit(1) from None
    print(f"sent {count} entries to run {args.run_id}")


if __name__ == "__main__":
    main()
