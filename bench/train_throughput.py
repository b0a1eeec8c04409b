"""Training throughput (images/s) of the classic conv VAE on 28x28 MNIST, against baselines in the same run.

- ours: the real entry point (`vae/train.py`: loader, Accelerate, logging, the per-step host sync), its
  steady-state `train/samples_per_s` read back from MLflow;
- bare: the same model, batch, data (uint8 in memory) and objective in a plain PyTorch loop: the ceiling of
  what our loop can reach, so ours/bare is the product's own overhead (goal on CPU: >= 0.95);
- example: the PyTorch example's style, fp32, batch 128, a DataLoader over in-memory float tensors.
It also prints the model's forward+backward FLOPs per image and the fraction of the device's measured peak.

    .venv/bin/python bench/train_throughput.py [--batch 512 1024] [--images 8192] [--device cpu|cuda]
        [--variants fp32-eager-resident bf16-compiled-streamed ... | all]
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

import mlflow
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

import pipeline
from vae.config import LossSection
from vae.losses import training_loss
from vae.models import build_model

REPO = Path(__file__).resolve().parents[1]
LOSS = LossSection()  # the default objective (Bernoulli ELBO), exactly what the trainer calls
MNIST = REPO.parent / "shared" / "data" / "mnist"


def make_shards(out: Path, n_train: int) -> torch.Tensor:
    """The first `n_train` MNIST training images (and 1,024 test images) as shards, through the `arrays` source;
    returns the training images as uint8 (N, 1, 28, 28) for the in-memory loops."""
    source = pipeline.build_source("idx", {"root": str(MNIST)})
    files, labels = {}, {}
    for split, n in (("train", n_train), ("test", 1024)):
        records = list(itertools.islice(source.records(split), n))
        files[split], labels[split] = out / f"{split}-images.npy", out / f"{split}-labels.npy"
        np.save(files[split], np.stack([r.image for r in records]))
        np.save(labels[split], np.array([r.label for r in records]))
    pipeline.ingest("arrays", {"files": files, "labels": labels}, out / "shards", 4096, 1024, progress=False)
    images, _ = pipeline.read_split(out / "shards", "train")
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def flops_per_image(device: str) -> float:
    model = build_model("conv", (1, 28, 28), 2).to(device)
    x = torch.rand(64, 1, 28, 28, device=device)
    with FlopCounterMode(display=False) as counter:
        training_loss(model, x, LOSS, 0).loss.backward()
    return counter.get_total_flops() / 64


def measured_peak(device: str) -> float:
    """FLOP/s of a large fp32 matmul on this device: the ceiling the fractions are taken against."""
    a = torch.randn(2048, 2048, device=device)
    for _ in range(2):
        a @ a
    sync(device)
    start, reps = time.perf_counter(), 10
    for _ in range(reps):
        a @ a
    sync(device)
    return 2 * 2048**3 * reps / (time.perf_counter() - start)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bare_loop(images: torch.Tensor, batch: int, steps: int, device: str) -> float:
    torch.manual_seed(0)
    model = build_model("conv", (1, 28, 28), 2).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = images.to(device)
    batches = [data[i : i + batch] for i in range(0, len(data) - batch + 1, batch)]
    warmup = 2
    for i, xb in enumerate(itertools.islice(itertools.cycle(batches), steps + warmup)):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        x = xb.float().div_(255.0)
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


# Settings of our loop, by variant name: precision x compilation x where the training split lives.
VARIANTS = {
    f"{precision}-{mode}-{data}": ["--train.mixed_precision", "no" if precision == "fp32" else "bf16",
                                   "--train.compile", str(mode == "compiled").lower(), "--data.resident",
                                   "on" if data == "resident" else "off"]
    for precision in ("fp32", "bf16") for mode in ("eager", "compiled") for data in ("resident", "streamed")
}
DEFAULT_VARIANT = "fp32-eager-resident"


def our_loop(shard_dir: Path, batch: int, tmp: Path, device: str, variant: str = DEFAULT_VARIANT) -> float:
    """Two epochs through vae/train.py; the median logged samples/s of the second (steady state, so compilation
    is not counted)."""
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    out = tmp / f"run-{batch}-{variant}"
    cmd = [sys.executable, str(REPO / "vae/train.py"), "--ingest.shard_dir", str(shard_dir), "--train.batch_size",
           str(batch), "--train.epochs", "2", "--train.log_every", "2", "--train.output_dir", str(out),
           "--tracking.finalize", "false", "--tracking.tracking_uri", uri, *VARIANTS[variant]]
    env = {**os.environ, "TQDM_DISABLE": "1", "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "")
           if device == "cuda" else ""}
    subprocess.run(cmd, check=True, env=env, cwd=tmp, capture_output=True)
    meta = json.loads(sorted(out.glob("checkpoints/*/meta.json"))[-1].read_text())
    history = mlflow.MlflowClient(uri).get_metric_history(meta["mlflow_run_id"], "train/samples_per_s")
    second_epoch = sorted(m.value for m in history if m.step > meta["steps_per_epoch"])
    return second_epoch[len(second_epoch) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", nargs="+", default=[DEFAULT_VARIANT], choices=[*VARIANTS, "all"],
                        help="our loop's settings, precision-compilation-data (all: the 8 combinations); the "
                        "ratios are against the bare fp32 eager loop on resident data")
    args = parser.parse_args()
    variants = list(VARIANTS) if "all" in args.variants else args.variants
    if not MNIST.is_dir():
        sys.exit(f"needs real MNIST at {MNIST}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = make_shards(tmp, args.images)
        flops, peak = flops_per_image(args.device), measured_peak(args.device)
        rows = []
        for batch in args.batch:
            steps = max(4, args.images // batch)
            bare = bare_loop(images, batch, steps, args.device)
            for variant in variants:
                ours = our_loop(tmp / "shards", batch, tmp, args.device, variant)
                rows.append({"batch": batch, "variant": variant, "ours_img_s": round(ours), "bare_img_s": round(bare),
                             "ours_over_bare": round(ours / bare, 3),
                             "fraction_of_peak": round(ours * flops / peak, 4)})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # progress: a run takes minutes on a CPU
        example = example_loop(images, max(8, args.images // 128), args.device)
    for row in rows:
        row["ours_over_example"] = round(row["ours_img_s"] / example, 2)
    print(json.dumps({"device": args.device, "threads": torch.get_num_threads(), "images": args.images,
                      "model_flops_per_image_fwd_bwd": round(flops), "measured_peak_flop_s": round(peak),
                      "example_batch128_img_s": round(example), "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
