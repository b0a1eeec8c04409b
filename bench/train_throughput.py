"""Training throughput (images/s) of the classic conv VAE on 28x28 MNIST, against baselines in the same run.

- ours: the real entry point (`vae/train.py`: loader, Accelerate, logging, the per-step host sync), its
  steady-state `train/samples_per_s` read back from MLflow;
- bare: the same model, batch, data (uint8 in memory) and objective in a plain PyTorch loop: the ceiling of
  what our loop can reach, so ours/bare is the product's own overhead (goal on CPU: >= 0.95);
- example: the PyTorch example's style, fp32, batch 128, a DataLoader over in-memory float tensors.
It also prints the model's forward+backward FLOPs per image and the fraction of the device's measured peak.

    .venv/bin/python bench/train_throughput.py [--batch 512 1024] [--images 8192] [--device cpu|cuda]
        [--variants fp32-eager-resident bf16-compiled-streamed-cl ... | all] [--out RESULT.json]

A variant is precision-compilation-data, with `-cl` for channels-last. The bare loop runs with the same
precision, compilation and memory format as each variant, so ours/bare is the product's overhead at that
setting. `--images` above MNIST's 60,000 repeats the training set (a GPU needs many steps at batch 16,384).
`model_flops_fraction_of_peak` is images/s times the classic layers' forward+backward FLOPs (as written:
upsample, then conv 5x5) over the device's measured dense matmul rate in the variant's compute dtype (bf16, or
fp32 with no TF32): the issue's compute ceiling. The model executes fewer FLOPs than that (its sub-pixel decoder,
`executed_flops_per_image_fwd_bwd`), so the fraction can pass 1 where the hardware is not the limit.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import mlflow
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

import pipeline
from vae.config import LossSection
from vae.models import build_model
from vae.objectives.elbo.losses import training_loss

REPO = Path(__file__).resolve().parents[1]
LOSS = LossSection()  # the default objective (Bernoulli ELBO), exactly what the trainer calls
MNIST = REPO.parent / "shared" / "data" / "mnist"


def make_shards(out: Path, n_train: int, n_test: int = 1024) -> torch.Tensor:
    """The first `n_train` MNIST training images (and `n_test` test images: our loop validates on them every
    epoch) as shards, through the `arrays` source; returns the training images as uint8 (N, 1, 28, 28) for the
    in-memory loops."""
    source = pipeline.build_source("idx", {"root": str(MNIST)})
    files, labels = {}, {}
    for split, n in (("train", n_train), ("test", n_test)):
        records = list(itertools.islice(itertools.cycle(source.records(split)), n))
        files[split], labels[split] = out / f"{split}-images.npy", out / f"{split}-labels.npy"
        np.save(files[split], np.stack([r.image for r in records]))
        np.save(labels[split], np.array([r.label for r in records]))
    pipeline.ingest("arrays", {"files": files, "labels": labels}, out / "shards", 4096, 1024, progress=False)
    images, _ = pipeline.read_split(out / "shards", "train")
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def flops_per_image(device: str, reference: bool = True) -> float:
    """Forward+backward FLOPs per image of the classic layers as written (`reference`: upsample then conv 5x5,
    the count the compute ceiling is defined by), or of what the model runs (its sub-pixel decoder does less)."""
    model = build_model("conv", (1, 28, 28), 2).to(device)
    if reference:
        model.decode_params = model.reference_decode_params
    x = torch.rand(64, 1, 28, 28, device=device)
    with FlopCounterMode(display=False) as counter:
        training_loss(model, x, LOSS, 0).loss.backward()
    return counter.get_total_flops() / 64


def measured_peak(device: str, dtype: torch.dtype, n: int | None = None) -> float:
    """FLOP/s of a large matmul in `dtype` on this device (random data): the ceiling the fractions are taken
    against. n x n: by default 8,192 on a GPU (what fills an H100), 2,048 on a CPU."""
    n = n or (8192 if device == "cuda" else 2048)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start, reps = time.perf_counter(), 10
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bare_loop(images: torch.Tensor, batch: int, steps: int, device: str, variant: str = "fp32-eager-resident",
              warmup: int = 3) -> float:
    """A plain loop over uint8 batches already on the device, with the variant's precision, compilation and
    memory format: no loader, no Accelerate, no logging, no host sync until the end. `warmup` steps run before
    the clock starts (compiled: the first steps compile, forward and backward)."""
    setting = Variant.parse(variant)
    torch.manual_seed(0)
    model = build_model("conv", (1, 28, 28), 2).to(device)
    memory_format = torch.channels_last if setting.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    if setting.compiled:
        model.compile(**({"mode": "reduce-overhead"} if setting.graphs else {}))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = images.to(device)
    batches = [data[i : i + batch] for i in range(0, len(data) - batch + 1, batch)]
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=setting.precision == "bf16")
    for i, xb in enumerate(itertools.islice(itertools.cycle(batches), steps + warmup)):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        x = xb.float().div_(255.0).contiguous(memory_format=memory_format)
        with autocast:
            loss = training_loss(model, x, LOSS, 0).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    return steps * batch / (time.perf_counter() - start)


def example_loop(images: torch.Tensor, steps: int, device: str) -> float:
    """The PyTorch VAE example's loop: fp32 tensors, DataLoader(batch_size=128, shuffle=True), loss.item() per step."""
    torch.manual_seed(0)
    model = build_model("conv", (1, 28, 28), 2).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(TensorDataset(images.float() / 255.0), batch_size=128, shuffle=True)
    seen, start = 0, time.perf_counter()
    for (x,) in itertools.islice(itertools.cycle(loader), steps):
        x = x.to(device)
        optimizer.zero_grad()
        loss = training_loss(model, x, LOSS, 0).loss
        loss.backward()
        optimizer.step()
        loss.item()
        seen += len(x)
    return seen / (time.perf_counter() - start)


class Variant(NamedTuple):
    """One setting of the matrix, named precision-compilation-data[-cl], e.g. bf16-compiled-resident-cl;
    compilation `graphs` is `compiled` replayed as CUDA graphs (train.cuda_graphs; a GPU only)."""

    precision: str  # fp32 | bf16
    compiled: bool
    resident: bool
    channels_last: bool
    graphs: bool = False

    @classmethod
    def parse(cls, name: str) -> Variant:
        precision, mode, data, *cl = name.split("-")
        return cls(precision, mode in ("compiled", "graphs"), data == "resident", bool(cl), mode == "graphs")

    def overrides(self) -> list[str]:
        """vae/train.py's options for this setting."""
        return ["--train.mixed_precision", "no" if self.precision == "fp32" else "bf16",
                "--train.compile", str(self.compiled).lower(), "--data.resident", "on" if self.resident else "off",
                "--train.channels_last", str(self.channels_last).lower(),
                "--train.cuda_graphs", str(self.graphs).lower()]


VARIANTS = [f"{precision}-{mode}-{data}{cl}" for precision in ("fp32", "bf16") for mode in ("eager", "compiled")
            for data in ("resident", "streamed") for cl in ("", "-cl")]
GRAPH_VARIANTS = [v.replace("-compiled-", "-graphs-") for v in VARIANTS if "-compiled-" in v]  # CUDA only
DEFAULT_VARIANT = "fp32-eager-resident"


def our_loop(shard_dir: Path, batch: int, tmp: Path, device: str, variant: str = DEFAULT_VARIANT,
             epochs: int = 2, log_every: int = 2) -> float:
    """`epochs` epochs through vae/train.py; the median logged samples/s after the first (steady state, so
    compilation is not counted; with one epoch, a smoke run's, every reading counts). Each log is a host sync
    and a journal write: `log_every` 20 is the product's default, 2 gives more readings on short runs."""
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    out = tmp / f"run-{batch}-{variant}"
    cmd = [sys.executable, str(REPO / "vae/train.py"), "--ingest.shard_dir", str(shard_dir), "--train.batch_size",
           str(batch), "--train.epochs", str(epochs), "--train.log_every", str(log_every),
           "--train.output_dir", str(out), "--tracking.finalize", "false", "--tracking.tracking_uri", uri,
           *Variant.parse(variant).overrides()]
    env = {**os.environ, "TQDM_DISABLE": "1", **({"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {})}
    result = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{variant} at batch {batch} failed:\n{result.stderr[-3000:]}")
    meta = json.loads(sorted(out.glob("checkpoints/*/meta.json"))[-1].read_text())
    history = mlflow.MlflowClient(uri).get_metric_history(meta["mlflow_run_id"], "train/samples_per_s")
    warm = meta["steps_per_epoch"] if epochs > 1 else 0
    steady = sorted(m.value for m in history if m.step > warm)
    return steady[len(steady) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", help="default: 512 1024 on a CPU, 512 to 16,384 on a GPU")
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", nargs="+", default=[DEFAULT_VARIANT], choices=[*VARIANTS, *GRAPH_VARIANTS, "all"],
                        help="our loop's settings, precision-compilation-data[-cl] (all: the 16 combinations "
                        "without CUDA graphs); "
                        "each is compared with the bare loop at the same settings")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of our loop; the first is not counted")
    parser.add_argument("--log-every", type=int, default=2, help="our loop's train.log_every (product default 20)")
    args = parser.parse_args()
    variants = list(VARIANTS) if "all" in args.variants else args.variants
    batches = args.batch or ([512, 1024, 2048, 4096, 8192, 16384] if args.device == "cuda" else [512, 1024])
    if not MNIST.is_dir():
        sys.exit(f"needs real MNIST at {MNIST}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = make_shards(tmp, args.images)
        flops = flops_per_image(args.device)
        peaks = {"fp32": measured_peak(args.device, torch.float32), "bf16": measured_peak(args.device, torch.bfloat16)}
        example = example_loop(images, max(8, min(args.images, 120_000) // 128), args.device)
        print(f"example loop (fp32, batch 128, DataLoader): {example:,.0f} img/s", file=sys.stderr, flush=True)
        rows = []
        for batch in batches:
            steps = max(4, args.images // batch)
            for variant in variants:
                bare = bare_loop(images, batch, steps, args.device, variant)
                ours = our_loop(tmp / "shards", batch, tmp, args.device, variant, args.epochs, args.log_every)
                peak = peaks[Variant.parse(variant).precision]
                rows.append({"batch": batch, "variant": variant, "ours_img_s": round(ours), "bare_img_s": round(bare),
                             "ours_over_bare": round(ours / bare, 3), "ours_over_example": round(ours / example, 2),
                             "model_flops_fraction_of_peak": round(ours * flops / peak, 4)})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # progress: a run takes minutes on a CPU
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
              "epochs": args.epochs, "log_every": args.log_every,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "images": args.images,
              "model_flops_per_image_fwd_bwd": round(flops),
              "executed_flops_per_image_fwd_bwd": round(flops_per_image(args.device, reference=False)),
              "measured_peak_flop_s": {k: round(v) for k, v in peaks.items()},
              "compute_ceiling_img_s": {k: round(v / flops) for k, v in peaks.items()},
              "example_batch128_img_s": round(example), "runs": rows}
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
