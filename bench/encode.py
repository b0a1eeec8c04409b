"""Encoding a photo collection into latents: `vaepipe encode` (shards -> latent shards) against the plain loop
people write (torchvision `ImageFolder` + `DataLoader` + `AutoencoderKL.encode` + `torch.save` per batch), on the
same photos and the same model, in one run.

Data: JPEG q90 crops of scikit-learn's two sample photographs (bench/photo_loader.py's tree). Model: a randomly
initialised aekl exported as a diffusers folder (the encoder's cost depends on its widths, not its weights);
`--channels 128 256 512 512` is SD's VAE. Each arm runs in its own process (so its peak memory is its own) with
the same torch threads, loader workers, batch and precision; the arms are interleaved (A B A B ...) for `--rounds`
rounds, so a busy box slows both alike, and the ratio printed is the median of the rounds' ratios. The ingest
that writes the shards is timed apart, once. Prints JSON: per arm and round images/s (wall), CPU seconds per image
(process and its loader workers), peak RSS of the process and of its largest worker.

Arms: `plain` (the loop above), `vaepipe` (`encode_dataset` with its defaults); for ablations, `vaepipe-mapped`
(vaepipe with `keep_freed_memory=False`) and `plain-heap` (the plain loop under glibc's environment switches
MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647, what `keep_freed_memory` sets from inside).

    .venv/bin/python bench/encode.py [--images 512] [--side 256] [--batch 32] [--workers 1] [--threads 2]
        [--channels 32 64 128 128] [--device cpu] [--precision fp32] [--rounds 3] [--arms plain vaepipe]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.photo_loader import photo_tree  # noqa: E402


def peak_mib() -> dict[str, float]:
    """Peak resident memory of this process and of its largest finished child (loader workers), MiB."""
    return {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "peak_worker_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)}


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the loader workers)."""
    return sum(u.ru_utime + u.ru_stime for u in map(resource.getrusage, (resource.RUSAGE_SELF,
                                                                          resource.RUSAGE_CHILDREN)))


def plain(args: argparse.Namespace, out: Path) -> int:
    """The loop from the issue: ImageFolder, DataLoader, encode, torch.save per batch."""
    from diffusers import AutoencoderKL
    from torch.utils.data import DataLoader
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(args.root, transform=transforms.Compose([
        transforms.ToTensor(), transforms.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])]))
    loader = DataLoader(dataset, batch_size=args.batch, num_workers=args.workers, shuffle=False)
    vae = AutoencoderKL.from_pretrained(args.model).eval().to(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    out.mkdir()
    n = 0
    with torch.no_grad(), torch.autocast(torch.device(args.device).type, dtype=dtype, enabled=dtype is not None):
        for i, (x, y) in enumerate(loader):
            dist = vae.encode(x.to(args.device)).latent_dist
            torch.save({"mean": dist.mean.cpu(), "std": dist.std.cpu(), "labels": y}, out / f"{i:06d}.pt")
            n += len(x)
    return n


def vaepipe(args: argparse.Namespace, out: Path) -> int:
    from vae.latents import EncodeOptions, encode_dataset, load_encoder

    options = EncodeOptions(batch_size=args.batch, workers=args.workers, device=args.device,
                            precision=args.precision, keep_freed_memory=args.arm != "vaepipe-mapped")
    index = encode_dataset(load_encoder(args.model), args.shards, out, options)
    return sum(split.num_samples for split in index.splits.values())


ARMS = {"plain": plain, "vaepipe": vaepipe, "vaepipe-mapped": vaepipe, "plain-heap": plain}
GLIBC_HEAP = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "2147483647"}  # plain-heap's environment


def arm(args: argparse.Namespace) -> None:
    """One arm, in this process: print its JSON line."""
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        start, cpu = time.perf_counter(), cpu_seconds()
        n = ARMS[args.arm](args, Path(tmp) / "out")
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
        size = sum(p.stat().st_size for p in (Path(tmp) / "out").rglob("*") if p.is_file())
    print(json.dumps({"arm": args.arm, "images": n, "seconds": round(seconds, 2),
                      "images_per_s": round(n / seconds, 1),
                      "cpu_s_per_image": round(cpu / n, 3), "output_mib": round(size / 2**20, 1), **peak_mib()}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--side", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--channels", type=int, nargs="+", default=[32, 64, 128, 128])
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the arms (median ratio)")
    p.add_argument("--arms", nargs="+", choices=tuple(ARMS), default=["plain", "vaepipe"],
                   help="the first is the baseline every other arm is divided by")
    p.add_argument("--arm", choices=tuple(ARMS), help=argparse.SUPPRESS)
    for hidden in ("--root", "--model", "--shards"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.arm:
        return arm(args)
    import pipeline
    from vae.models.spec import build_from_spec, model_spec
    from vae.registry.diffusers import export_diffusers

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = photo_tree(tmp / "photos" / "train", args.images, args.side).parent
        torch.manual_seed(0)
        spec = model_spec("aekl", (3, args.side, args.side), 4, channels=args.channels, layers_per_block=2,
                          norm_groups=32 if min(args.channels) >= 32 else 8, likelihood="gaussian")
        model = export_diffusers(build_from_spec(spec), tmp / "vae")
        start = time.perf_counter()
        pipeline.ingest("imagefolder", {"root": str(root)}, tmp / "shards", progress=False)
        ingest_s = time.perf_counter() - start
        common = ["--batch", str(args.batch), "--workers", str(args.workers), "--threads", str(args.threads),
                  "--device", args.device, "--precision", args.precision, "--root", str(root / "train"),
                  "--model", str(model), "--shards", str(tmp / "shards")]
        rounds: dict[str, list[dict]] = {name: [] for name in args.arms}
        for _ in range(args.rounds):
            for name in args.arms:
                env = {**os.environ, **(GLIBC_HEAP if name == "plain-heap" else {})}
                line = subprocess.run([sys.executable, __file__, "--arm", name, *common], check=True, env=env,
                                      stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1]
                rounds[name].append(json.loads(line))
    base = args.arms[0]
    ratios = {name: statistics.median(r["images_per_s"] / b["images_per_s"]
                                      for r, b in zip(rounds[name], rounds[base], strict=True))
              for name in args.arms[1:]}
    summary = {name: {"images_per_s": [r["images_per_s"] for r in runs],
                      "cpu_s_per_image": [r["cpu_s_per_image"] for r in runs],
                      **{k: max(r[k] for r in runs) for k in ("peak_rss_mib", "peak_worker_rss_mib", "output_mib")}}
               for name, runs in rounds.items()}
    config = {k: v for k, v in vars(args).items() if k not in ("arm", "root", "model", "shards")}
    print(json.dumps({"config": config, "ingest_s": round(ingest_s, 2), **summary,
                      **{f"median_ratio_{name}_over_{base}": round(r, 2) for name, r in ratios.items()}}, indent=2))

if __name__ == "__main__":
    main()
