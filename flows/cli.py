"""The `vaepipe` command: demo, ingest, encode, evaluate, serve, status, models, train, verify.

Config fields are overridden as `--section.field VALUE` after the command (`vaepipe demo --train.epochs 3`);
an invalid config stops with the field and the allowed values, exit status 2. `vaepipe ingest` also stops with
status 2 and one line, before Prefect starts, when the source cannot list its splits (a wrong root) or the
shard directory is a file, not writable, holds files vaepipe did not write, or is locked by a running ingest.

The modules that pull in torch, Prefect or MLflow (`flows.train_vae`, `flows.ingest_dataset`, `vae.tracking`,
`vae.registry.store`, the heavy half of `pipeline`) are imported inside the command that needs them, for speed
alone: `vaepipe --help`, `status` and `train` take 0.2-0.4 s; with those imports at the top, 5.1 s (median wall
time on the 2-core dev box).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from flows import serve, temporary_server
from flows.evaluate import add_evaluate_command, evaluate
from vae.config import ConfigError, RunConfig, field_help, load_config

DEFAULT_PRESET = Path("infra/configs/digits.yaml")

TRAIN_HELP = """\
Training without Prefect runs the entry point directly under Accelerate:

  accelerate launch vae/train.py --config infra/configs/digits.yaml [--section.field VALUE ...]

Two CPU ranks (gloo) on one machine:

  ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
      --mixed_precision no --dynamo_backend no vae/train.py --config infra/configs/digits.yaml \\
      --train.expected_world_size 2

With GPUs, put the topology in an Accelerate YAML (infra/accelerate/) and pass --config_file.
Under Slurm, Kubernetes or any supervisor that preempts: `python -m vae.launch` with the same arguments
as `accelerate launch`; signal it (SIGTERM) and it exits 75 once every rank has checkpointed:
rerun with --train.resume true.
The whole pipeline (ingest, train, evaluate, register) is `vaepipe demo`, or the deployment
`prefect deployment run train-vae/train-vae` under `vaepipe serve`.
"""


def parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The root parser and the config-taking subcommands' parsers (their `error` exits with status 2)."""
    root = argparse.ArgumentParser(
        prog="vaepipe", description="Train VAEs: Prefect ingestion to WebDataset shards, Accelerate, MLflow."
    )
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    with_config = add_flow_commands(commands)
    add_serve_commands(commands)
    commands.add_parser("train", help="how to train directly with accelerate launch")
    check = commands.add_parser(
        "verify", help="check a shard directory's shards against the sha256 in its index.json",
        description="Check every shard of a shard directory (local path or fsspec URL) against index.json; "
        "name each bad shard. Exit status 0 when all match, 1 otherwise.",
    )
    check.add_argument("shard_dir", help="shard directory, e.g. data/shards/digits or s3://bucket/prefix")
    add_models_command(commands)
    add_evaluate_command(commands)
    latents = commands.add_parser(
        "encode", help="encode a shard directory into latent shards with an aekl model",
        description="Encode every image of SHARD_DIR (each once) with MODEL into latent shards in OUT_DIR: per image "
        "the posterior's mean and std, key and label; index.json, written last, records the model, the source "
        "index's sha256, dtype, shape, scaling_factor and shift_factor. A killed encode resumes, keeping finished "
        "shards.",
    )
    latents.add_argument("model", help="models:/NAME@ALIAS, models:/NAME/VERSION or a diffusers folder")
    latents.add_argument("shard_dir", help="a complete shard directory (vaepipe ingest): a path or fsspec URL (s3://...)")
    latents.add_argument("out_dir", help="where the latent shards go (new, empty, or an interrupted encode): a path or "
                         "fsspec URL")
    latents.add_argument("--split", action="append", dest="splits", help="a split to encode (repeat; default all)")
    latents.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                         help="stored dtype of mean and std (bfloat16 as raw uint16 bits; default float16)")
    latents.add_argument("--flip", action="store_true", help="also store each image's mirrored twin")
    latents.add_argument("--crop-size", type=int, nargs=2, metavar=("H", "W"), help="centre crop before encoding")
    latents.add_argument("--samples-per-shard", type=int, default=4096, help="images per latent shard (4096)")
    latents.add_argument("--batch-size", type=int, default=32, help="images per forward pass (32)")
    latents.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    latents.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="encoder compute")
    latents.add_argument("--workers", type=int, default=0, help="loader processes decoding the images (0)")
    latents.add_argument("--tracking-uri", help="MLflow URI holding a models:/ MODEL (default as `vaepipe models`)")
    latents.add_argument("--overwrite", action="store_true", help="encode again into a complete OUT_DIR")
    latents.add_argument("--no-track", action="store_true", help="record no MLflow run (experiment encode-latents)")
    return root, with_config


def add_flow_commands(commands) -> dict[str, argparse.ArgumentParser]:
    """`demo` and `ingest`: a preset, config overrides listed in the epilog."""
    config_epilog = "config fields (override as --section.field VALUE):\n" + field_help()
    with_config = {}
    for name, text in (
        ("demo", "run the train-vae flow here and print the registered model; MLflow: MLFLOW_TRACKING_URI when "
                 "set, else an embedded store (./mlflow.db), as the first line says"),
        ("ingest", "run the ingest-dataset flow: source -> shard directory"),
    ):
        sub = with_config[name] = commands.add_parser(
            name, help=text, description=text, epilog=config_epilog, allow_abbrev=False,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.add_argument("--config", type=Path, help=f"YAML preset (default {DEFAULT_PRESET} when present)")
    return with_config


def add_serve_commands(commands) -> None:
    """`serve` (or `serve --stop`) and `status`."""
    start = commands.add_parser(
        "serve", help="start Prefect and MLflow servers and serve the deployments (Ctrl-C stops all)",
        description="Start a Prefect server, an MLflow server (sqlite, artifacts proxied) and a runner serving "
        "train-vae/train-vae and ingest-dataset/ingest-dataset, whose runs log to that MLflow; state in "
        ".vaepipe/ under the working directory.",
    )
    start.add_argument("--host", default="127.0.0.1")
    start.add_argument("--port", type=int, default=4200, help="Prefect server (API and UI) port (default 4200)")
    start.add_argument("--mlflow-port", type=int, default=5000, help="MLflow server port (default 5000)")
    start.add_argument("--runner-port", type=int, default=4201, help="the runner's /health port (default 4201)")
    start.add_argument("--train-concurrency", type=serve.positive_int, default=1, metavar="N",
                       help="at most N train-vae runs at once; later runs wait for a slot (default 1)")
    start.add_argument("--stop", action="store_true", help="stop the servers and runner started from this directory")
    commands.add_parser(
        "status", help="whether the Prefect server, MLflow server and runner of `vaepipe serve` here are running",
        description="One line per process of `vaepipe serve` in this directory: running (pid alive and its URL "
        f"answering) or not, with its URL. Exit status 0 when all three run, {serve.STATUS_NOT_RUNNING} when any "
        "does not.",
    )


def add_models_command(commands) -> None:
    """`models list` and `models pull`, each taking --tracking-uri after the action's name."""
    models = commands.add_parser(
        "models", help="list the registered models, or pull one's files into a directory",
        description="The MLflow model registry at --tracking-uri (default: MLFLOW_TRACKING_URI, else the MLflow "
        "server `vaepipe serve` runs from this directory, else ./mlflow.db).",
    )
    store = argparse.ArgumentParser(add_help=False)  # the option both actions take, after the action's name
    store.add_argument("--tracking-uri", help="MLflow server or store URI (default: MLFLOW_TRACKING_URI, else the "
                       "server of `vaepipe serve` here, else sqlite:///<working directory>/mlflow.db)")
    models_commands = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    models_commands.add_parser("list", parents=[store],
                               help="every registered model: versions, aliases, headline tags (val_nll, val_psnr, ...)")
    pull = models_commands.add_parser(
        "pull", parents=[store],
        help="download a model (MLmodel, weights.safetensors, config.json, code) into a new directory",
        description="Download NAME (its champion), NAME@ALIAS or NAME/VERSION (with or without models:/) into DIR, "
        "which must be missing or "
        "empty; the result serves with `mlflow models serve -m DIR --env-manager local`.",
    )
    pull.add_argument("ref", metavar="NAME[@ALIAS]", help="e.g. vae-digits, vae-digits@challenger, vae-digits/3, "
                      "or MLflow's models:/vae-digits@champion")
    pull.add_argument("dest", metavar="DIR", type=Path, help="destination directory (missing or empty)")
    pull.add_argument("--format", choices=("mlflow", "diffusers"), default="mlflow",
                      help="mlflow: the whole MLflow model; diffusers: only an aekl model's diffusers folder "
                      "(config.json + diffusion_pytorch_model.safetensors), for AutoencoderKL.from_pretrained(DIR)")


def load(sub: argparse.ArgumentParser, path: Path | None, overrides: list[str]) -> RunConfig:
    """The run config from a preset and overrides; a ConfigError ends the command with status 2."""
    if path is None and DEFAULT_PRESET.is_file():
        path = DEFAULT_PRESET
    try:
        return load_config(path, overrides)
    except ConfigError as err:
        sub.error(str(err))  # prints usage and the message, exits 2


def choose_tracking_store(cfg: RunConfig) -> None:
    """Set the demo's MLflow store and say it on the first line: --tracking.tracking_uri, else MLFLOW_TRACKING_URI
    (as the training entry point and the flow honour it), else the embedded sqlite store in this directory."""
    from vae.tracking.store import embedded_uri  # deferred: MLflow, ~1.8 s (module docstring)

    if cfg.tracking.tracking_uri is not None:
        where = f"MLflow: {cfg.tracking.tracking_uri} (--tracking.tracking_uri)"
    elif os.environ.get("MLFLOW_TRACKING_URI"):
        cfg.tracking.tracking_uri = os.environ["MLFLOW_TRACKING_URI"]
        where = f"MLflow: {cfg.tracking.tracking_uri} (MLFLOW_TRACKING_URI)"
    else:
        cfg.tracking.tracking_uri = embedded_uri()
        where = (f"MLflow: the embedded store {cfg.tracking.tracking_uri} (set MLFLOW_TRACKING_URI to log to a "
                 "server instead)")
    print(where, flush=True)


def demo(cfg: RunConfig) -> int:
    """Run the train-vae flow and print the objective's headline figures (saved in evaluation.json: the ELBO
    family's NLL and ELBO, aekl's PSNR and SSIM) and the registered model; 1 when the flow fails."""
    from flows.train_vae import train_vae  # deferred: torch, Prefect and MLflow, ~3.3 s (module docstring)

    try:
        summary = train_vae(cfg)
    except Exception as err:  # the flow run's log above holds the traceback
        print(f"\nerror: the train-vae flow failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    uri = cfg.tracking.tracking_uri
    ui = uri if uri.startswith(("http://", "https://")) else f"mlflow ui --backend-store-uri {uri}"
    print(f"""
final evaluation   {summary['headline']}
registered model   models:/{summary['model_name']}/{summary['version']} \
({'now the champion' if summary['champion'] else 'the champion alias stayed on an earlier version'})
load it            mlflow.pyfunc.load_model("{summary['model_uri']}")  (with MLFLOW_TRACKING_URI={uri})
MLflow UI          {ui}""")
    return 0


def preflight(cfg: RunConfig) -> int | None:
    """Check the ingest's source and destination before any Prefect machinery starts: one line and status 2
    when either is unusable, else None."""
    import pipeline  # deferred: torch, ~2 s (module docstring)

    try:
        pipeline.check_ingest(cfg.source.name, cfg.source.options, cfg.shard_dir, cfg.ingest.storage_options)
    except (pipeline.SourceError, pipeline.DestinationError, pipeline.DirectoryLockedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return None


def ingest(cfg: RunConfig) -> int:
    """Run the ingest-dataset flow (a progress bar on a terminal); 1 when the flow fails. `preflight` first."""
    from flows.ingest_dataset import ingest_dataset  # deferred: torch and Prefect, ~3 s (module docstring)

    try:
        print(ingest_dataset(cfg.source, cfg.ingest))
    except Exception as err:  # the flow run's log above holds the traceback
        print(f"\nerror: the ingest-dataset flow failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


def models(args: argparse.Namespace) -> int:
    """`vaepipe models list|pull`: 0 on success, 1 with one line naming what exists instead."""
    from mlflow.exceptions import MlflowException  # deferred, as the two below: MLflow, ~1.4 s

    # deferred: MLflow and torch, ~3.2 s (module docstring)
    from vae.registry.store import ModelStoreError, format_table, list_models, pull_diffusers, pull_model
    from vae.tracking.store import embedded_uri  # deferred: MLflow, ~1.8 s

    # a server `vaepipe serve` runs from here holds what its flow runs registered; ./mlflow.db is the demo's
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or serve.served_mlflow_url() or embedded_uri()
    try:
        if args.models_command == "list":
            print(format_table(list_models(uri)) or f"no registered models at {uri}")
            return 0
        if args.format == "diffusers":
            name, version, dest = pull_diffusers(args.ref, args.dest, uri)
            print(f"pulled {name} version {version}'s diffusers folder into {dest}\nload it: "
                  f"diffusers.AutoencoderKL.from_pretrained({str(dest)!r})")
            return 0
        name, version, dest = pull_model(args.ref, args.dest, uri)
    except (ModelStoreError, MlflowException) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"pulled {name} version {version} into {dest}\nserve it: mlflow models serve -m {dest} --env-manager local")
    return 0


def verify(shard_dir: str) -> int:
    """Print one line per bad shard (or that all are intact); 1 when any is bad or the directory is incomplete."""
    import pipeline  # deferred: torch, ~2 s (module docstring)

    try:
        problems = pipeline.verify(shard_dir)
    except pipeline.ShardFormatError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for problem in problems:
        print(f"BAD {problem}")
    if problems:
        print(f"{len(problems)} bad shard(s) in {shard_dir}: delete them and {pipeline.INDEX_NAME}, then re-run the "
              "ingest with the same config (intact shard groups are kept, the rest rewritten)", file=sys.stderr)
        return 1
    print(f"ok: every shard in {shard_dir} matches its sha256 in {pipeline.INDEX_NAME}")
    return 0


def encode(args: argparse.Namespace) -> int:
    """`vaepipe encode MODEL SHARD_DIR OUT_DIR`: 0 once index.json is written, 1 with one line on a refusal."""
    from vae.latents import EncodeOptions, load_encoder  # deferred: torch, diffusers, ~4 s
    from vae.latents.ranks import encode_on_ranks  # deferred: as above
    from vae.latents.tracking import log_encode_run  # deferred: MLflow, ~1.8 s
    from vae.tracking.store import embedded_uri  # deferred: MLflow, ~1.8 s

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or serve.served_mlflow_url() or embedded_uri()
    try:
        options = EncodeOptions(splits=args.splits, dtype=args.dtype, flip=args.flip, crop_size=args.crop_size,
                                samples_per_shard=args.samples_per_shard, batch_size=args.batch_size,
                                device=args.device, precision=args.precision, workers=args.workers)
        # under `accelerate launch`, each rank encodes its groups; rank 0 writes index.json and returns it
        index = encode_on_ranks(load_encoder(args.model, uri), args.shard_dir, args.out_dir, options, args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as err:  # pydantic's ValidationError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 1
    if index is None:  # a rank other than 0: rank 0 reports
        return 0
    total = sum(split.num_samples for split in index.splits.values())
    if not args.no_track:
        print(f"MLflow run {log_encode_run(index, args.out_dir, uri)} at {uri} (experiment encode-latents)")
    print(f"wrote {total} latents {tuple(index.latent_shape)} {index.dtype} into {args.out_dir} "
          f"(scaling_factor {index.scaling_factor}, shift_factor {index.shift_factor})")
    return 0


def start_or_stop_serving(args: argparse.Namespace) -> int:
    """`vaepipe serve`, or `vaepipe serve --stop`."""
    if args.stop:
        return serve.stop()
    return serve.serve(args.host, args.port, args.mlflow_port, args.runner_port, args.train_concurrency)


def print_train_help(args: argparse.Namespace) -> int:
    """`vaepipe train`: how to train without Prefect."""
    print(TRAIN_HELP, end="")
    return 0


class FlowCommand(NamedTuple):
    """A command that runs a flow on a run config."""

    prepare: Callable[[RunConfig], int | None]  # before the temporary server; an exit status ends the command
    run: Callable[[RunConfig], int]


# the commands that take no config overrides (anything left over on their command line is an error) ...
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "encode": encode,
    "evaluate": evaluate,
    "models": models,
    "serve": start_or_stop_serving,
    "status": lambda args: serve.status(),
    "train": print_train_help,
    "verify": lambda args: verify(args.shard_dir),
}
# ... and those that run a flow on a config built from a preset and the rest of the command line
FLOWS = {
    "demo": FlowCommand(prepare=choose_tracking_store, run=demo),  # the first line: where the run and model go
    "ingest": FlowCommand(prepare=preflight, run=ingest),  # a wrong root costs one line, not a server start
}


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_flow(command: FlowCommand, cfg: RunConfig) -> int:
    """`command.prepare`, then its flow beside a temporary Prefect server; 130 on Ctrl-C or SIGTERM."""
    # without PREFECT_API_URL, Prefect starts a temporary local server; its telemetry heartbeat only adds
    # "database is locked" tracebacks on sqlite
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # SIGTERM unwinds like Ctrl-C: the training group is killed and Prefect's temporary server stopped
    # (under the default action the temporary server would be orphaned)
    signal.signal(signal.SIGTERM, _interrupt)
    if (refused := command.prepare(cfg)) is not None:
        return refused
    try:
        # started before the flow: a generous start-up wait, and the server dies with this process (kill -9 too)
        temporary_server.start()
        return command.run(cfg)
    except temporary_server.StartupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    """`vaepipe COMMAND ...`: the exit status of the command."""
    root, with_config = parser()
    args, rest = root.parse_known_args(argv)
    if args.command in COMMANDS:
        if rest:
            root.error(f"unrecognized arguments: {' '.join(rest)}")
        return COMMANDS[args.command](args)
    cfg = load(with_config[args.command], args.config, rest)
    return run_flow(FLOWS[args.command], cfg)


if __name__ == "__main__":
    sys.exit(main())
