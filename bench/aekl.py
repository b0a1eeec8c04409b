"""aekl training: vaepipe against the plain loop people copy today, same model, same losses, same steps.

The plain loop is diffusers' `examples/research_projects/autoencoderkl/train_autoencoderkl.py` reduced to its
core: a torchvision `ImageFolder` + `DataLoader`, random flips, fp32, Adam, one `AutoencoderKL`, the loss
L1 + kl_weight * KL (+ LPIPS and the PatchGAN when asked), here computed by vae/aekl_losses.py for both arms so
only the machinery differs. Data: real photos (scikit-learn's two and scikit-image's colour photographs) cut
into `--side` px crops at random places and scales: train crops and held-out test crops. Each arm runs in its
own process (peak memory is that process's maximum resident set on CPU, or torch's peak allocation on CUDA).
Quality: PSNR and SSIM of the posterior-mean reconstructions of the test crops (vae/aekl_eval.py).

The vaepipe arm ingests the same tree into shards and runs `vae/train.py --model.arch aekl`. It runs only when
the trainer computes the aekl objective (it imports vae.aekl_losses); until the trainer seam (issue 15, branch
i15-seam) is merged it is reported as not wired rather than trained on another objective.

    .venv/bin/python bench/aekl.py [--steps 60] [--batch 8] [--side 128] [--out bench/results/aekl-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL = {"channels": [16, 32, 32], "layers_per_block": 1, "norm_groups": 8, "attention": False}  # f4, 4 latents


def photos() -> list[np.ndarray]:
    """Real colour photographs shipped with scikit-learn and scikit-image (no download)."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    images = list(load_sample_images().images)
    for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry"):
        images.append(getattr(data, name)())
    return [i for i in images if i.ndim == 3 and i.shape[2] == 3]


def photo_tree(root: Path, train: int, test: int, side: int, seed: int = 0) -> Path:
    """root/{train,test}/photos/*.png: crops at random places and scales, resized to side x side."""
    rng = np.random.default_rng(seed)
    pictures = photos()
    for split, n in (("train", train), ("test", test)):
        folder = root / split / "photos"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            photo = pictures[int(rng.integers(len(pictures)))]
            size = int(rng.integers(side, min(photo.shape[:2]) + 1))
            top, left = rng.integers(0, photo.shape[0] - size + 1), rng.integers(0, photo.shape[1] - size + 1)
            crop = Image.fromarray(photo[top : top + size, left : left + size]).resize((side, side), Image.LANCZOS)
            crop.save(folder / f"{i:05d}.png")
    return root


def test_images(root: Path) -> torch.Tensor:
    files = sorted((root / "test" / "photos").glob("*.png"))
    return torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])).permute(0, 3, 1, 2)


def loss_section(args):
    from vae.config import AeklLossSection

    return AeklLossSection(recon="l1", kl_weight=1e-6, disc_weight=0.5 if args.disc_start >= 0 else 0.0,
                           disc_start=max(args.disc_start, 0))


def quality(model, root: Path) -> dict:
    from vae.aekl_eval import aekl_metrics, aekl_sums

    sums, moments = aekl_sums(model, test_images(root).split(16), "cpu")
    metrics, _ = aekl_metrics(sums, moments, lpips_present=False)
    return {"psnr": round(metrics["val/psnr"], 3), "ssim": round(metrics["val/ssim"], 4)}


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def plain_arm(args, root: Path) -> dict:
    """diffusers' train_autoencoderkl.py loop, reduced: ImageFolder + DataLoader, fp32, Adam."""
    from torchvision import datasets, transforms

    from vae.aekl_losses import build_discriminator, discriminator_loss, generator_loss
    from vae.models import build_model

    torch.manual_seed(args.seed)
    cfg = loss_section(args)
    model = build_model("aekl", (3, args.side, args.side), 4, **MODEL).train()
    disc = build_discriminator(cfg, 3)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    d_opt = torch.optim.Adam(disc.parameters(), lr=args.lr) if disc is not None else None
    dataset = datasets.ImageFolder(str(root / "train"), transform=transforms.Compose(
        [transforms.RandomHorizontalFlip(), transforms.ToTensor()]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, shuffle=True, drop_last=True,
                                         num_workers=args.workers, persistent_workers=args.workers > 0)
    step, start, timed_from = 0, None, args.warmup
    while step < args.steps:
        for x, _ in loader:
            if step == timed_from:
                start = time.perf_counter()
            out = model.autoencode(x)
            terms = generator_loss(out, x, cfg, step, disc=disc, last_layer=model.last_layer)
            opt.zero_grad(set_to_none=True)
            terms.loss.backward()
            opt.step()
            if disc is not None:
                d = discriminator_loss(disc, x, out.recon, cfg, step)
                if d.active:
                    d_opt.zero_grad(set_to_none=True)
                    d.loss.backward()
                    d_opt.step()
            step += 1
            if step == args.steps:
                break
    seconds = time.perf_counter() - start
    return {"images_per_s": round((args.steps - timed_from) * args.batch / seconds, 2), **quality(model, root),
            "peak_memory_mb": round(peak_memory_mb(), 1), "steps": args.steps}


def wired() -> bool:
    import vae.trainer  # noqa: F401

    return "vae.aekl_losses" in sys.modules


def vaepipe_arm(args, root: Path, tmp: Path) -> dict:
    """The same run through `vae/train.py` (shards, the trainer, checkpoints), in a child process."""
    if not wired():
        return {"skipped": "the trainer does not compute the aekl objective yet (issue 15's trainer seam, branch "
                           "i15-seam); this arm runs once it does"}
    from safetensors.torch import load_file

    import pipeline
    from vae import checkpoint
    from vae.models import build_model

    shards = tmp / "shards"
    pipeline.ingest("imagefolder", {"root": str(root)}, shards, samples_per_shard=64, block_size=1, progress=False)
    per_epoch = args.train // args.batch
    out = tmp / "run"
    overrides = {
        "source.name": "imagefolder", "source.options": json.dumps({"root": str(root)}), "ingest.shard_dir": shards,
        "model.arch": "aekl", **{f"model.{k}": json.dumps(v) for k, v in MODEL.items()}, "model.latent_dim": 4,
        "loss.likelihood": "gaussian", "loss.aekl.recon": "l1", "loss.aekl.kl_weight": 1e-6,
        "optim.lr": args.lr, "train.batch_size": args.batch, "train.epochs": -(-args.steps // per_epoch),
        "train.seed": args.seed, "train.output_dir": out, "tracking.finalize": "none", "data.flip": "true",
        "tracking.tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
    }
    if args.disc_start >= 0:
        overrides |= {"loss.aekl.disc_weight": 0.5, "loss.aekl.disc_start": args.disc_start}
    cmd = [sys.executable, str(REPO / "vae" / "train.py")] + [a for k, v in overrides.items() for a in (f"--{k}",
                                                                                                       str(v))]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        return {"error": done.stderr[-2000:]}
    path = checkpoint.latest(out)
    model = build_model("aekl", (3, args.side, args.side), 4, **MODEL)
    model.load_state_dict(load_file(path / "model.safetensors"))
    steps = checkpoint.read_meta(path)["step"]
    return {"images_per_s_with_startup": round(steps * args.batch / seconds, 2), **quality(model, root),
            "steps": steps, "note": "wall time includes process start-up (the trainer logs train/samples_per_s)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--side", type=int, default=128)
    parser.add_argument("--train", type=int, default=256, help="train crops")
    parser.add_argument("--test", type=int, default=32, help="held-out test crops")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers of the plain loop")
    parser.add_argument("--disc-start", type=int, default=-1, help="PatchGAN from this step; -1: no GAN")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arm", choices=("plain", "vaepipe"), help=argparse.SUPPRESS)  # one arm, in a child
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.arm:  # a child: one arm, its JSON on stdout's last line
        with tempfile.TemporaryDirectory() as tmp:
            arm = plain_arm(args, args.root) if args.arm == "plain" else vaepipe_arm(args, args.root, Path(tmp))
        print(json.dumps(arm))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = photo_tree(Path(tmp) / "photos", args.train, args.test, args.side, args.seed)
        arms = {}
        for name in ("plain", "vaepipe"):
            child = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("arm", "root", "out")]
            done = subprocess.run([sys.executable, __file__, *child, "--arm", name, "--root", str(root)],
                                  capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
            arms[name] = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {
                "error": done.stderr[-2000:]}
    result = {"side": args.side, "batch": args.batch, "steps": args.steps, "train_crops": args.train,
              "test_crops": args.test, "model": MODEL, "threads": torch.get_num_threads(),
              "device": "cuda" if torch.cuda.is_available() else "cpu", "arms": arms}
    plain, ours = arms["plain"], arms["vaepipe"]
    if "psnr" in plain and "psnr" in ours:
        result["psnr_difference_db"] = round(ours["psnr"] - plain["psnr"], 3)
        result["images_per_s_ratio"] = round(ours["images_per_s_with_startup"] / plain["images_per_s"], 3)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
