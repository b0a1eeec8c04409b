"""Large batch without losing quality: validation ELBO per epoch at a global batch of 8,192 (with the LR scaling
rule and warm-up) against batch 128, same epochs, same data. Plots both curves, logs runs and plot to MLflow.

    .venv/bin/python bench/large_batch.py [--arch mlp] [--epochs 10] [--seed 0] [--variant NAME ...] [--parallel N]
    .venv/bin/python bench/large_batch.py --replot RESULT.json --out PLOT.png   # redraw from the JSON it printed
    .venv/bin/python bench/large_batch.py --replot A.json B.json --only b128 NAME --out PLOT.png  # runs of both

Each variant is a set of overrides for vae/train.py; the first is the reference (batch 128). Prints JSON with
each variant's final val ELBO and its gap to the reference (goal: within 1 nat). `--parallel N` trains N
variants at once: on a GPU host an MLP leaves the card nearly idle, so the sweep takes as long as its longest run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402

import pipeline  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MNIST = REPO.parent / "shared" / "data" / "mnist"

def b8192(optimizer: str = "adam", lr: str | None = None, kl_warmup: int = 0, cosine: bool = False,
          *extra: str) -> list[str]:
    """Overrides of a batch-8,192 variant: the optimiser and its peak rate (None: optim.lr as the config has it),
    10 lr warm-up steps unless `extra` says otherwise, KL warm-up steps, cosine decay or a constant rate."""
    return ["--train.batch_size", "8192", "--optim.name", optimizer, *(["--optim.lr", lr] if lr else []),
            "--optim.warmup_steps", "10", "--loss.warmup_steps", str(kl_warmup),
            "--optim.schedule", "cosine" if cosine else "constant", *extra]


VARIANTS = {
    "b128": ["--train.batch_size", "128"],
    "b8192-none": ["--train.batch_size", "8192"],
    "b8192-sqrt-warmup": b8192("adam", None, 0, False, "--optim.lr_scaling", "sqrt"),
    "b8192-linear-warmup": b8192("adam", None, 0, False, "--optim.lr_scaling", "linear", "--optim.grad_clip", "10"),
    "b8192-sqrt-cosine": b8192("adam", None, 0, True, "--optim.lr_scaling", "sqrt", "--optim.warmup_steps", "7"),
    "b8192-lr2e-2-cosine": b8192("adam", "2e-2", 0, True, "--optim.warmup_steps", "7", "--optim.grad_clip", "100"),
    "b128-muon": ["--train.batch_size", "128", "--optim.name", "muon"],  # Muon at the reference batch and rate
    "b1024-sqrt": ["--train.batch_size", "1024", "--optim.lr_scaling", "sqrt", "--optim.warmup_steps", "20"],
    # KL warm-up against the early posterior collapse that a large rate causes
    "b8192-sqrt-klwarm": b8192("adam", None, 30, False, "--optim.lr_scaling", "sqrt"),
    "b8192-lr2e-2-klwarm": b8192("adam", "2e-2", 40),
    "b8192-lr5e-2-klwarm-clip": b8192("adam", "5e-2", 40, False, "--optim.grad_clip", "50"),
    # LAMB: Adam with a layer-wise trust ratio (lr is the per-step fraction of each layer's norm)
    "b8192-lamb-1e-2": b8192("lamb", "1e-2"),
    "b8192-lamb-3e-2": b8192("lamb", "3e-2"),
    "b8192-lamb-3e-2-klwarm": b8192("lamb", "3e-2", 40),
    "b8192-lamb-1e-1-klwarm": b8192("lamb", "1e-1", 40),
    # Adam's second moment with beta2 0.999 still averages the huge first gradients after 70 steps
    "b8192-lr2e-2-klwarm-b2": b8192("adam", "2e-2", 40, False, "--optim.beta2", "0.95"),
    "b8192-lamb-3e-2-klwarm-b2": b8192("lamb", "3e-2", 40, False, "--optim.beta2", "0.95"),
    # with more epochs a constant high rate ends in noise (Adam) or drift (LAMB): decay it over the run
    "b8192-lr2e-2-klwarm-cosine": b8192("adam", "2e-2", 40, True),
    "b8192-lamb-3e-2-klwarm-cosine": b8192("lamb", "3e-2", 40, True),
    "b8192-lamb-5e-2-klwarm-cosine": b8192("lamb", "5e-2", 40, True),
    "b8192-lamb-3e-2-klwarm200-cosine": b8192("lamb", "3e-2", 200, True),
    "b8192-lamb-3e-2-klwarm400-cosine": b8192("lamb", "3e-2", 400, True),
    "b8192-lamb-2e-2-klwarm200-cosine": b8192("lamb", "2e-2", 200, True),
    # the late noise of the LAMB curve: average the weights (EMA, used for validation), warm the rate up over 5%
    # of the 700 steps, a lower peak, and a KL warm-up over half the run
    "b8192-lamb-2e-2-klwarm200-cosine-ema99": b8192("lamb", "2e-2", 200, True, "--train.ema_decay", "0.99"),
    "b8192-lamb-2e-2-klwarm200-cosine-ema98": b8192("lamb", "2e-2", 200, True, "--train.ema_decay", "0.98"),
    "b8192-lamb-2e-2-klwarm200-cosine-lrwarm35": b8192("lamb", "2e-2", 200, True, "--optim.warmup_steps", "35"),
    "b8192-lamb-1.5e-2-klwarm200-cosine": b8192("lamb", "1.5e-2", 200, True),
    "b8192-lamb-1e-2-klwarm200-cosine": b8192("lamb", "1e-2", 200, True),
    "b8192-lamb-2e-2-klwarm350-cosine": b8192("lamb", "2e-2", 350, True),
    "b8192-lamb-3e-2-klwarm200-cosine-lrwarm35-ema99": b8192("lamb", "3e-2", 200, True, "--optim.warmup_steps", "35",
                                                            "--train.ema_decay", "0.99"),
    # the curves flatten as the cosine rate dies: keep a floor, or anneal KL longer
    "b8192-lamb-2e-2-klwarm350-cosine-floor10": b8192("lamb", "2e-2", 350, True, "--optim.min_lr_ratio", "0.1"),
    "b8192-lamb-2e-2-klwarm500-cosine": b8192("lamb", "2e-2", 500, True),
    "b8192-lamb-2.5e-2-klwarm350-cosine": b8192("lamb", "2.5e-2", 350, True),
    "b8192-lamb-2e-2-klwarm350-cosine-floor20": b8192("lamb", "2e-2", 350, True, "--optim.min_lr_ratio", "0.2"),
    "b8192-lamb-2e-2-klwarm350-cosine-floor30": b8192("lamb", "2e-2", 350, True, "--optim.min_lr_ratio", "0.3"),
    "b8192-lamb-2.5e-2-klwarm350-cosine-floor10": b8192("lamb", "2.5e-2", 350, True, "--optim.min_lr_ratio", "0.1"),
    # LAMB as published decays weights (decoupled, 0.01)
    "b8192-lamb-2e-2-klwarm350-cosine-floor20-wd1e-2": b8192("lamb", "2e-2", 350, True, "--optim.min_lr_ratio", "0.2",
                                                             "--optim.weight_decay", "1e-2"),
    "b8192-lamb-2e-2-klwarm350-cosine-floor20-wd1e-3": b8192("lamb", "2e-2", 350, True, "--optim.min_lr_ratio", "0.2",
                                                             "--optim.weight_decay", "1e-3"),
    # Muon: orthogonalised momentum for the weight matrices (AdamW for biases), at AdamW-matched rates
    **{f"b8192-muon-{lr}-klwarm350-cosine-floor20": b8192("muon", lr, 350, True, "--optim.min_lr_ratio", "0.2")
       for lr in ("1e-2", "2e-2", "4e-2", "8e-2")},
    # the rate from the scaling rule (1e-3 at batch 128): sqrt gives 8e-3, linear 6.4e-2
    **{f"b8192-muon-{rule}-klwarm350-cosine-floor20": b8192("muon", None, 350, True, "--optim.min_lr_ratio", "0.2",
                                                            "--optim.lr_scaling", rule) for rule in ("sqrt", "linear")},
    # without the KL warm-up and the floor that LAMB needed
    **{f"b8192-muon-{lr}-cosine": b8192("muon", lr, 0, True)
       for lr in ("1e-2", "1.5e-2", "2e-2", "3e-2", "4e-2", "5e-2")},
    "b8192-muon-linear-cosine": b8192("muon", None, 0, True, "--optim.lr_scaling", "linear"),
}


def run_variant(name: str, overrides: list[str], args, shards: Path, uri: str, tmp: Path) -> dict:
    out = tmp / name
    cmd = [sys.executable, str(REPO / "vae/train.py"), "--config", str(REPO / "infra/configs/mnist.yaml"),
           "--source.options.root", str(MNIST), "--ingest.shard_dir", str(shards), "--model.arch", args.arch,
           "--model.latent_dim", str(args.latent), "--train.epochs", str(args.epochs), "--train.output_dir", str(out),
           "--tracking.finalize", "false", "--tracking.tracking_uri", uri, "--tracking.experiment", "large-batch",
           "--tracking.run_name", name, "--train.keep_checkpoints", "1", "--train.seed", str(args.seed), *overrides]
    start = time.perf_counter()
    result = subprocess.run(cmd, env={**os.environ, "TQDM_DISABLE": "1"}, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{name} failed:\n{result.stderr[-3000:]}")
    meta = json.loads(sorted(out.glob("checkpoints/*/meta.json"))[-1].read_text())
    history = mlflow.MlflowClient(uri).get_metric_history(meta["mlflow_run_id"], "val/elbo")
    return {"name": name, "global_batch": meta["global_batch"], "run_id": meta["mlflow_run_id"],
            "curve": [round(m.value, 3) for m in sorted(history, key=lambda m: m.step)],
            "wall_s": round(time.perf_counter() - start, 1)}


def plot(runs: list[dict], arch: str, out: Path) -> None:
    """Validation ELBO per epoch, one line per variant: the whole run on the left (y from the worst value at
    epoch 3 on: the first epochs of a large batch sit hundreds of nats below), and on the right the second half
    with its own y range, where the gaps that matter (a few nats) can be read."""
    fig, (whole, late) = plt.subplots(1, 2, figsize=(12, 4.8))
    epochs = max(len(r["curve"]) for r in runs)
    first_late = max(1, epochs // 2)
    for r in runs:
        x = range(1, len(r["curve"]) + 1)
        line, = whole.plot(x, r["curve"], marker="o" if epochs <= 20 else None,
                           label=f"{r['name']} (B={r['global_batch']}): {r['curve'][-1]:.2f}")
        late.plot(x[first_late - 1 :], r["curve"][first_late - 1 :], color=line.get_color(),
                  marker="o" if epochs <= 20 else None)
    for ax, first in ((whole, 3), (late, first_late)):
        values = [v for r in runs for v in r["curve"][first - 1 :]] or [v for r in runs for v in r["curve"]]
        low, high = min(values), max(values)
        ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
        ax.set(xlabel="epoch", ylabel="validation ELBO (nats)")
        ax.grid(alpha=0.3)
    whole.set_title(f"{arch} VAE on MNIST: batch size, {epochs} epochs")
    late.set_title(f"epochs {first_late} to {epochs}")
    whole.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def merge_runs(reports: list[dict], only: list[str] | None = None) -> list[dict]:
    """The runs of several reports of this script, named with their report's seed when there are several (the
    same variant at two seeds is two lines), keeping only the variants named in `only` if it is given."""
    return [{**r, "name": f"{r['name']} seed {report.get('seed', 0)}" if len(reports) > 1 else r["name"]}
            for report in reports for r in report["runs"] if only is None or r["name"] in only]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="mlp", help="mlp on CPU (cheap); conv where a GPU is at hand")
    parser.add_argument("--latent", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="train.seed of every variant (weights, sampling, data "
                        "order): run twice with different seeds to see the spread between runs")
    parser.add_argument("--variant", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("bench/large_batch.png"))
    parser.add_argument("--replot", type=Path, nargs="+", metavar="JSON",
                        help="redraw the plot from this script's JSON output; from several, their runs together, each "
                        "name followed by its seed")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="with --replot: draw only these variants")
    parser.add_argument("--parallel", type=int, default=1, help="variants trained at once (default 1: timings mean "
                        "something only then)")
    parser.add_argument("--json", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    if args.replot is not None:
        reports = [json.loads(path.read_text()) for path in args.replot]
        runs = merge_runs(reports, args.only)
        if not runs:
            sys.exit(f"none of {args.only} is in {[str(p) for p in args.replot]}")
        plot(runs, reports[0]["arch"], args.out)
        return
    if not MNIST.is_dir():
        sys.exit(f"needs real MNIST at {MNIST}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{tmp / 'mlflow.db'}"
        pipeline.ingest("idx", {"root": str(MNIST)}, tmp / "shards", progress=False)
        # one sqlite store per variant when several write at once (sqlite takes one writer at a time)
        uris = {v: uri if args.parallel == 1 or "MLFLOW_TRACKING_URI" in os.environ else f"sqlite:///{tmp / v}.db"
                for v in args.variant}
        with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
            runs = list(pool.map(lambda v: run_variant(v, VARIANTS[v], args, tmp / "shards", uris[v], tmp),
                                 args.variant))
        reference = runs[0]["curve"][-1]
        for r in runs:
            r["final_val_elbo"] = r["curve"][-1]
            r["gap_nats"] = round(reference - r["curve"][-1], 3)
        plot(runs, args.arch, args.out)
        for r in runs:
            mlflow.MlflowClient(uris[r["name"]]).log_artifact(r["run_id"], str(args.out))
    report = {"arch": args.arch, "epochs": args.epochs, "seed": args.seed, "reference": runs[0]["name"],
              "parallel": args.parallel, "plot": str(args.out), "runs": runs}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
