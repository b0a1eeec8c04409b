"""aekl training: vaepipe against the plain loop people copy today, same model, same losses, same steps.

The plain loop is diffusers' `examples/research_projects/autoencoderkl/train_autoencoderkl.py` reduced to its
core: a torchvision `ImageFolder` + `DataLoader`, random flips, fp32, Adam, one `AutoencoderKL`, the loss
L1 + kl_weight * KL (+ LPIPS and the PatchGAN when asked), here computed by vae/objectives/aekl/losses.py for both
arms so
only the machinery differs. Data: real photos (scikit-learn's two and scikit-image's colour photographs) cut
into `--side` px crops at random places and scales: train crops and held-out test crops. Each arm runs in its
own process (peak memory is that process's maximum resident set on CPU, or torch's peak allocation on CUDA).
Quality: PSNR and SSIM of the posterior-mean reconstructions of the test crops (vae/objectives/aekl/evaluation.py).

The vaepipe arm ingests the same tree into shards and runs `vae/train.py --model.arch aekl` (the trainer's
AeklObjective) in a child process. Its images/s is the trainer's own per-step `train/samples_per_s` (logged every
step, read back from the run's MLflow store) over the same timed steps as the plain loop, so process start-up,
ingestion and the end-of-epoch checkpoint are not counted; its peak memory is the training child's maximum
resident set (RUSAGE_CHILDREN). `--train` defaults to steps x batch crops: one epoch, no validation inside the
timed steps.

`--finetune`: the fine-tuning measurement instead. A model trained here on the photo crops (the "pretrained" VAE,
exported as a diffusers folder) is fine-tuned decoder-only (`--model.pretrained DIR --model.train_encoder false`)
on another domain, real handwritten digits (scikit-learn's 8x8 digits upscaled to --side, grey as RGB), and the
validation PSNR on held-out digits is measured before and after; the encoder's latents are checked bit-equal.

    .venv/bin/python bench/aekl.py [--steps 60] [--batch 8] [--side 128] [--out bench/results/aekl-cpu.json]
    .venv/bin/python bench/aekl.py --finetune [--steps 40] [--side 64] [--out bench/results/aekl-finetune-cpu.json]
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


def test_images(root: Path, kind: str = "photos") -> torch.Tensor:
    files = sorted((root / "test" / kind).glob("*.png"))
    return torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])).permute(0, 3, 1, 2)


def loss_section(args):
    from vae.config import AeklLossSection

    return AeklLossSection(recon="l1", kl_weight=1e-6, disc_weight=0.5 if args.disc_start >= 0 else 0.0,
                           disc_start=max(args.disc_start, 0))


def quality(model, root: Path, kind: str = "photos") -> dict:
    from vae.objectives.aekl.evaluation import aekl_metrics, aekl_sums

    sums, moments = aekl_sums(model, test_images(root, kind).split(16), "cpu")
    metrics, _ = aekl_metrics(sums, moments, lpips_present=False)
    return {"psnr": round(metrics["val/psnr"], 3), "ssim": round(metrics["val/ssim"], 4)}


def peak_memory_mb(who: int = resource.RUSAGE_SELF) -> float:
    if torch.cuda.is_available() and who == resource.RUSAGE_SELF:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(who).ru_maxrss / 1024  # kB on Linux


def plain_arm(args, root: Path) -> dict:
    """diffusers' train_autoencoderkl.py loop, reduced: ImageFolder + DataLoader, fp32, Adam."""
    from torchvision import datasets, transforms

    from vae.models import build_model
    from vae.objectives.aekl.losses import build_discriminator, discriminator_loss, generator_loss

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


def vaepipe_arm(args, root: Path, tmp: Path) -> dict:
    """The same run through `vae/train.py` (shards, the trainer, checkpoints), in a child process."""
    import mlflow

    import pipeline

    shards = tmp / "shards"
    pipeline.ingest("imagefolder", {"root": str(root)}, shards, samples_per_shard=64, block_size=1, progress=False)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    out = tmp / "run"
    done, seconds = train_child(args, shards, out, uri)
    if done.returncode:
        return {"error": done.stderr[-2000:]}
    model, meta = trained_model(out)
    rates = [m.value for m in sorted(mlflow.MlflowClient(uri).get_metric_history(meta["mlflow_run_id"],
                                                                                 "train/samples_per_s"),
                                     key=lambda m: m.step)]
    timed = rates[args.warmup :]  # the steps the plain loop times: images / (sum of per-step seconds)
    return {"images_per_s": round(len(timed) * args.batch / sum(args.batch / r for r in timed), 2),
            **quality(model, root), "peak_memory_mb": round(peak_memory_mb(resource.RUSAGE_CHILDREN), 1),
            "steps": meta["global_step"], "wall_s_with_startup": round(seconds, 1)}


def train_child(args, shards: Path, out: Path, uri: str, *extra: str):
    """`vae/train.py` on `shards` for one epoch (args.steps steps of args.batch when the train split holds
    steps x batch images), logging every step; (result, seconds)."""
    overrides = {
        "ingest.shard_dir": shards, "model.arch": "aekl", "model.latent_dim": 4, "loss.likelihood": "gaussian",
        "loss.aekl.recon": "l1", "loss.aekl.kl_weight": 1e-6, "optim.lr": args.lr, "train.batch_size": args.batch,
        "train.epochs": 1, "train.seed": args.seed, "train.output_dir": out,
        "train.log_every": 1, "tracking.finalize": "none", "tracking.system_metrics": "false", "data.flip": "true",
        "tracking.tracking_uri": uri,
    }
    if "--model.pretrained" not in extra:
        overrides |= {f"model.{k}": json.dumps(v) for k, v in MODEL.items()}
    if args.disc_start >= 0:
        overrides |= {"loss.aekl.disc_weight": 0.5, "loss.aekl.disc_start": args.disc_start}
    cmd = [sys.executable, str(REPO / "vae" / "train.py"), *extra]
    cmd += [a for k, v in overrides.items() for a in (f"--{k}", str(v))]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=out.parent, capture_output=True, text=True)
    return done, time.perf_counter() - start


def trained_model(out: Path):
    """The newest checkpoint's model (rebuilt from its meta.json) and the meta."""
    from vae.training import checkpoint
    from vae.training.trained import load_checkpoint

    model, meta = load_checkpoint(checkpoint.latest(out))
    return model.eval(), meta


def digit_tree(root: Path, train: int, test: int, side: int) -> Path:
    """root/{train,test}/digits/*.png: scikit-learn's real 8x8 handwritten digits, upscaled to side x side, grey
    as RGB (another domain than the photos: flat strokes on black)."""
    from sklearn.datasets import load_digits

    images = (load_digits().images / 16 * 255).astype(np.uint8)  # (1797, 8, 8), 0..16 -> 0..255
    for split, chosen in (("train", images[:train]), ("test", images[-test:])):
        folder = root / split / "digits"
        folder.mkdir(parents=True, exist_ok=True)
        for i, digit in enumerate(chosen):
            Image.fromarray(digit).resize((side, side), Image.BICUBIC).convert("RGB").save(folder / f"{i:05d}.png")
    return root


def train_on(args, root: Path, work: Path, *extra: str):
    """Ingest the image tree `root` and train on it in a child process: (model, seconds)."""
    import pipeline

    shards = work / "shards"
    pipeline.ingest("imagefolder", {"root": str(root)}, shards, samples_per_shard=64, block_size=1, progress=False)
    done, seconds = train_child(args, shards, work / "run", f"sqlite:///{work / 'mlflow.db'}", *extra)
    if done.returncode:
        raise SystemExit(f"training in {work} failed:\n{done.stderr[-3000:]}")
    return trained_model(work / "run")[0], round(seconds, 1)


def finetune(args) -> None:
    """Pretrain on photo crops (args.steps), export the diffusers folder, fine-tune its decoder on digits
    (args.steps), PSNR on held-out digits before and after, encoder latents compared bit for bit."""
    from vae.registry.diffusers import export_diffusers

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photos_root = photo_tree(tmp / "photos", args.train, args.test, args.side, args.seed)
        digits_root = digit_tree(tmp / "digits", args.train, args.test, args.side)
        before, pretrain_s = train_on(args, photos_root, tmp / "pretrain")
        folder = export_diffusers(before, tmp / "pretrained")  # what a user downloads, or kept from a run
        after, finetune_s = train_on(args, digits_root, tmp / "finetune", "--model.pretrained", str(folder),
                                     "--model.train_encoder", "false")
        x = test_images(digits_root, "digits").float() / 255
        with torch.no_grad():
            same_latents = bool(torch.equal(before.encode_latents(x), after.encode_latents(x)))
        result = {"side": args.side, "batch": args.batch, "steps_each": args.steps, "train_images": args.train,
                  "test_images": args.test, "model": MODEL, "threads": torch.get_num_threads(),
                  "pretrained_on": "photo crops", "finetuned_on": "scikit-learn digits upscaled, decoder only",
                  "digits_before": quality(before, digits_root, "digits"),
                  "digits_after": quality(after, digits_root, "digits"),
                  "photos_before": quality(before, photos_root), "photos_after": quality(after, photos_root),
                  "encoder_latents_bit_equal": same_latents,
                  "seconds_with_startup": {"pretrain": pretrain_s, "finetune": finetune_s}}
    result["digits_psnr_gain_db"] = round(result["digits_after"]["psnr"] - result["digits_before"]["psnr"], 3)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--side", type=int, default=128)
    parser.add_argument("--train", type=int, help="train crops (default steps x batch: one epoch)")
    parser.add_argument("--test", type=int, default=32, help="held-out test crops")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers of the plain loop")
    parser.add_argument("--disc-start", type=int, default=-1, help="PatchGAN from this step; -1: no GAN")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arm", choices=("plain", "vaepipe"), help=argparse.SUPPRESS)  # one arm, in a child
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--finetune", action="store_true", help="measure decoder-only fine-tuning instead")
    args = parser.parse_args()
    args.train = args.train or args.steps * args.batch
    if args.finetune:
        finetune(args)
        return
    if args.arm:  # a child: one arm, its JSON on stdout's last line
        with tempfile.TemporaryDirectory() as tmp:
            arm = plain_arm(args, args.root) if args.arm == "plain" else vaepipe_arm(args, args.root, Path(tmp))
        print(json.dumps(arm))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = photo_tree(Path(tmp) / "photos", args.train, args.test, args.side, args.seed)
        arms = {}
        for name in ("plain", "vaepipe"):
            child = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                     if k not in ("arm", "root", "out", "finetune")]
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
        result["images_per_s_ratio"] = round(ours["images_per_s"] / plain["images_per_s"], 3)
        result["peak_memory_ratio"] = round(ours["peak_memory_mb"] / plain["peak_memory_mb"], 3)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
