"""Model quality the way papers report it: test NLL by IWAE-k (nats) and bits/dim, with what it cost.

One architecture per run; prints (and with --out writes) JSON: the figures, images seen, wall times, device.

- mnist: ../shared/data/mnist (IDX), dynamically binarised (a fresh Bernoulli draw of every training image at
  every step; the test images binarised once with a fixed seed), Bernoulli likelihood, test NLL by IWAE-k.
- cifar: ../shared/data/cifar10-subset (official binary batches: 10,000 training images, the first 1,000 test
  images), 8-bit pixels, discretised logistic mixture, bits/dim.

    .venv/bin/python bench/quality.py mnist --arch mlp --latent-dim 50 --hidden-layers 2 --epochs 100 --k 5000
    .venv/bin/python bench/quality.py cifar --arch resnet --minutes 10 --k 100

--save PATH keeps the trained weights (safetensors) and the model's arguments beside them (PATH.json), so a
costly evaluation can be rerun on them with --load PATH (no training; the model arguments are read from
PATH.json, so only the evaluation flags matter).

Training stops at --epochs or --minutes, whichever comes first. Published anchors (dynamically binarised MNIST,
k = 5,000): MLP VAE 86.76 nats (Burda et al. 2016, table 1), conv VAE ~81, NVAE 78.01; CIFAR-10 NVAE 2.91
and VDVAE 2.87 bits/dim.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vae.config import LossSection
from vae.models import build_model
from vae.objectives.elbo.evaluation import evaluate
from vae.objectives.elbo.losses import training_loss

MODEL_ARGS = ("dataset", "arch", "latent_dim", "hidden_dim", "hidden_layers", "width", "depth", "blocks", "groups",
              "mixtures", "batch_size", "lr", "warmup_steps", "seed")
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PUBLISHED = {("mnist", "mlp"): 86.76, ("mnist", "conv"): 81.0, ("mnist", "hvae"): 78.01}


def read_idx(path: Path) -> np.ndarray:
    """An IDX image file (gzipped) -> uint8 (N, 1, H, W)."""
    raw = gzip.decompress(path.read_bytes())
    n, h, w = (int.from_bytes(raw[i : i + 4], "big") for i in (4, 8, 12))
    return np.frombuffer(raw, np.uint8, offset=16).reshape(n, 1, h, w)


def read_cifar(path: Path) -> np.ndarray:
    """A CIFAR-10 binary batch (records of 1 label byte + 3x32x32 pixels) -> uint8 (N, 3, 32, 32)."""
    raw = np.fromfile(path, np.uint8).reshape(-1, 1 + 3 * 32 * 32)
    return raw[:, 1:].reshape(-1, 3, 32, 32)


def load(dataset: str, data: Path = DATA) -> tuple[torch.Tensor, torch.Tensor]:
    if dataset == "mnist":
        root = data / "mnist"
        return (torch.from_numpy(read_idx(root / "train-images-idx3-ubyte.gz").copy()),
                torch.from_numpy(read_idx(root / "t10k-images-idx3-ubyte.gz").copy()))
    root = data / "cifar10-subset"
    return (torch.from_numpy(read_cifar(root / "data_batch_1.bin").copy()),
            torch.from_numpy(read_cifar(root / "test_batch_first1000.bin").copy()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=["mnist", "cifar"])
    p.add_argument("--arch", default="mlp")
    p.add_argument("--latent-dim", type=int, default=50)
    p.add_argument("--hidden-dim", type=int, default=512)
    p.add_argument("--hidden-layers", type=int, default=2)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--blocks", type=int, default=1)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--mixtures", type=int, default=10)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--minutes", type=float, default=float("inf"), help="training wall-time budget")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=0, help="KL warm-up steps")
    p.add_argument("--k", type=int, default=5000, help="importance samples for the test NLL")
    p.add_argument("--test-images", type=int, default=10_000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    p.add_argument("--data", type=Path, default=DATA, help="folder holding mnist/ and cifar10-subset/")
    p.add_argument("--save", type=Path, help="write the trained weights here (and the model arguments to .json)")
    p.add_argument("--load", type=Path, help="evaluate weights written by --save instead of training")
    args = p.parse_args()
    saved = None
    if args.load is not None:
        meta = args.load.with_suffix(".json")
        if not args.load.is_file() or not meta.is_file():
            p.error(f"--load {args.load}: need the weights and {meta}, as written by --save")
        saved = json.loads(meta.read_text())
        for name in MODEL_ARGS:  # the saved model's arguments win over the command line's
            setattr(args, name, saved["args"][name])
        args.epochs = 0

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train, test = load(args.dataset, args.data)
    test = test[: args.test_images]
    mnist = args.dataset == "mnist"
    likelihood = "bernoulli" if mnist else "logistic_mixture"
    options = {name: getattr(args, name) for name in ("hidden_dim", "hidden_layers", "width", "depth", "blocks",
                                                      "groups")}
    import inspect

    from vae.models import MODELS

    accepted = inspect.signature(MODELS[args.arch]).parameters
    options = {k: v for k, v in options.items() if k in accepted}
    model = build_model(args.arch, tuple(train.shape[1:]), args.latent_dim, likelihood=likelihood,
                        mixtures=args.mixtures, **options).to(device)
    loss_cfg = LossSection(likelihood=likelihood, mixtures=args.mixtures, warmup_steps=args.warmup_steps)
    steps_per_epoch = len(train) // args.batch_size
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    total = max(args.epochs * steps_per_epoch, 1)
    # Cosine decay to lr/10 over the planned steps (a pure function of the step).
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.1 + 0.45 * (1 + math.cos(math.pi * min(s, total) / total)))
    train_dev = train.to(device)

    def prepare(images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255.0)
        return torch.bernoulli(x) if mnist else x

    step, seen, epochs_done = 0, 0, 0
    tick = time.perf_counter()
    deadline = tick + args.minutes * 60
    stopped_by_budget = False
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train), device=device)
        running = 0.0
        for i in range(steps_per_epoch):
            x = prepare(train_dev[order[i * args.batch_size : (i + 1) * args.batch_size]])
            terms = training_loss(model, x, loss_cfg, step)
            optimizer.zero_grad(set_to_none=True)
            terms.loss.backward()
            optimizer.step()
            schedule.step()
            step, seen = step + 1, seen + len(x)
            running += float(terms.elbo.detach().mean()) if i % 50 == 0 else 0.0
            if time.perf_counter() > deadline:
                stopped_by_budget = True
                break
        epochs_done = epoch + 1 if not stopped_by_budget else epoch + (i + 1) / steps_per_epoch
        print(f"epoch {epoch + 1}: train ELBO ~{running / math.ceil(steps_per_epoch / 50):.2f} "
              f"({time.perf_counter() - tick:.0f} s)", flush=True)
        if stopped_by_budget:
            break
    train_s = time.perf_counter() - tick
    if saved is not None:
        model.load_state_dict(load_file(args.load, device=str(device)))
        seen, step, epochs_done, train_s = saved["images_seen"], saved["steps"], saved["epochs"], saved["train_wall_s"]
        stopped_by_budget = saved["stopped_by_time_budget"]
    elif args.save is not None:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, args.save)
        args.save.with_suffix(".json").write_text(json.dumps({
            "args": {name: getattr(args, name) for name in MODEL_ARGS}, "images_seen": seen, "steps": step,
            "epochs": epochs_done, "train_wall_s": round(train_s, 1), "stopped_by_time_budget": stopped_by_budget,
        }, indent=2))

    torch.manual_seed(1234)  # the fixed binarisation of the test images, and the importance samples
    test_x = prepare(test.to(device))
    tick = time.perf_counter()
    result = evaluate(model, test_x.split(1000), k=args.k, prepare=lambda t: t, device=device)
    eval_s = time.perf_counter() - tick
    m = result.metrics
    report = {
        "dataset": args.dataset, "arch": args.arch, "likelihood": likelihood, "latent_dim": args.latent_dim,
        "options": options, "parameters": sum(p.numel() for p in model.parameters()),
        "test_nll_nats": m["val/nll_iwae"], "test_bpd": m["val/bpd"], "k": args.k, "test_images": len(test),
        "test_elbo": m["val/elbo"], "test_kl": m["val/kl"], "active_units": m["val/active_units"],
        "kl_per_group": result.kl_per_group, "recon_mse": m["val/recon_mse"],
        "epochs": epochs_done, "images_seen": seen, "steps": step, "batch_size": args.batch_size, "lr": args.lr,
        "stopped_by_time_budget": stopped_by_budget, "train_wall_s": round(train_s, 1),
        "eval_wall_s": round(eval_s, 1), "device": str(device) if device.type == "cuda" else
        f"cpu ({platform.processor() or platform.machine()}, {args.threads} threads; no GPU)",
        "torch": torch.__version__, "weights": str(args.save or args.load or ""),
        "published_nats": PUBLISHED.get((args.dataset, args.arch)),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
