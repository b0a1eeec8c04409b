"""`vaepipe evaluate MODEL [MODEL ...] --shards DIR`: aekl models scored under one evaluation protocol, one table.

The work is `vae.evaluation` (the evaluation the end of training runs); this file parses the command line, prints
the table and turns a refusal into one line and exit status 1. Imported by flows/cli.py at its start, so it imports
nothing heavy at the top.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from flows import serve

DESCRIPTION = """\
Score one or more aekl models (models:/NAME@ALIAS, models:/NAME/VERSION or diffusers folders) on the first
--count images of --split of a shard directory, under one evaluation protocol: PSNR per image on uint8 then
averaged, SSIM, LPIPS (AlexNet by default) and rFID when their weights are on this machine (torch hub cache;
nothing is downloaded; a metric without weights is absent, with the reason), posterior mode or sample. Prints
the protocol and one table; writes OUT/evaluation.json (the protocol and each model's numbers) and one MLflow
run per model (experiment evaluate-vae: the protocol's fields as params, its digest as a tag). rFID's real
image statistics are cached (--cache-dir) and reused by any later evaluation on the same images."""


def add_evaluate_command(commands) -> None:
    """The `evaluate` subcommand's arguments."""
    sub = commands.add_parser("evaluate", help="score aekl models side by side under one evaluation protocol",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub.add_argument("models", nargs="+", metavar="MODEL",
                     help="models:/NAME@ALIAS, models:/NAME/VERSION or a diffusers AutoencoderKL folder")
    sub.add_argument("--shards", required=True, help="a complete shard directory (vaepipe ingest)")
    sub.add_argument("--split", default="test", help="the split evaluated (default test, the held-out split)")
    sub.add_argument("--count", type=int, help="the split's first N images in file order (default: all)")
    sub.add_argument("--posterior", choices=("mode", "sample"), default="mode",
                     help="decode the posterior mean (mode, default) or one seeded draw of it (sample)")
    sub.add_argument("--crop-size", type=int, nargs=2, metavar=("H", "W"),
                     help="centre-crop the stored images to H x W first, as a run trained with data.crop_size "
                     "validates (default: whole images)")
    sub.add_argument("--seed", type=int, default=0, help="the draws' seed with --posterior sample (default 0)")
    sub.add_argument("--lpips", choices=("alex", "vgg", "none"), default="alex",
                     help="LPIPS network (default alex; vgg is the training loss's)")
    sub.add_argument("--lpips-weights", help="torchvision's backbone file (default: the torch hub cache)")
    sub.add_argument("--inception-weights", help="torch-fidelity's FID Inception file (default: the torch hub cache)")
    sub.add_argument("--out", type=Path, default=Path("evaluation"), help="where evaluation.json goes (./evaluation)")
    sub.add_argument("--cache-dir", type=Path,
                     help="rFID's cached real statistics (default $VAEPIPE_CACHE, else ~/.cache/vaepipe)")
    sub.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    sub.add_argument("--device", default="cpu", help="torch device (default cpu)")
    sub.add_argument("--tracking-uri", help="MLflow server or store URI (default: MLFLOW_TRACKING_URI, else the "
                     "server of `vaepipe serve` here, else sqlite:///<working directory>/mlflow.db)")
    sub.add_argument("--no-track", action="store_true", help="record no MLflow runs")


def evaluate(args: argparse.Namespace) -> int:
    """0 once the table is printed and evaluation.json written; 1 with one line on a refusal."""
    from mlflow.exceptions import MlflowException  # deferred: MLflow, ~1.4 s (flows/cli.py's docstring)

    from vae.evaluation import EvaluateOptions, evaluate_models, format_table  # deferred: torch, diffusers, ~4 s
    from vae.tracking.store import embedded_uri  # deferred: MLflow, ~1.8 s

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or serve.served_mlflow_url() or embedded_uri()
    try:
        options = EvaluateOptions(split=args.split, count=args.count, posterior=args.posterior, seed=args.seed,
                                  crop_size=args.crop_size,
                                  lpips=args.lpips, lpips_weights=args.lpips_weights,
                                  inception_weights=args.inception_weights, batch_size=args.batch_size,
                                  device=args.device, cache_dir=args.cache_dir)
        result = evaluate_models(args.models, args.shards, args.out, options, uri, track=not args.no_track)
    except (ValueError, FileNotFoundError, MlflowException) as err:  # ShardFormatError, ModelStoreError: ValueErrors
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    print(format_table(result))
    runs = ", ".join(m["run_id"] for m in result.models if "run_id" in m)
    if runs:
        print(f"MLflow runs {runs} at {uri} (experiment evaluate-vae)")
    print(f"wrote {args.out / 'evaluation.json'}")
    return 0
