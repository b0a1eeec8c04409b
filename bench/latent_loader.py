"""Reading latent shards: vaepipe's loader (`pipeline.open_loader` on a latent directory, streamed and resident)
against the plain webdataset lines of the README, on the same latent directory in the same process, alternated.

The latents are made by a real encode (`vae.latents.encode_dataset`) of random photos-sized images with a small
random aekl (f4, 4 latent channels: (4, 32, 32) fp16 per array, 8 kB, SD's size at 256 px), so the shards are
exactly what `vaepipe encode` writes. Every arm shuffles and hands out batches of mean and std tensors with
labels; each arm's epochs are timed (the resident split's one read is timed apart). Prints JSON with samples/s
per arm and the ratios to plain webdataset.

    .venv/bin/python bench/latent_loader.py [--images 4096] [--side 128] [--batch 256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

import pipeline
from pipeline.latents import read_index, restored
from vae.latents import EncodeOptions, encode_dataset, load_encoder
from vae.models.spec import build_from_spec, model_spec
from vae.registry.diffusers import export_diffusers


def make_latents(tmp: Path, n: int, side: int) -> Path:
    """n random RGB images (two labels) ingested, then encoded by a small random aekl into tmp/latents."""
    rng = np.random.default_rng(0)
    np.save(tmp / "images.npy", rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8))
    np.save(tmp / "labels.npy", np.arange(n) % 2)
    pipeline.ingest("arrays", {"files": {"train": tmp / "images.npy"}, "labels": {"train": tmp / "labels.npy"}},
                    tmp / "shards", 1024, 256, layout="packed", progress=False)
    torch.manual_seed(0)
    spec = model_spec("aekl", (3, side, side), 4, channels=[8, 8, 8], layers_per_block=1, norm_groups=4,
                      attention=False, likelihood="gaussian")
    folder = export_diffusers(build_from_spec(spec).eval(), tmp / "vae",
                              {"shift_factor": 0.0, "scaling_factor": 1.0, "mean": [0.0] * 4, "std": [1.0] * 4})
    encode_dataset(load_encoder(str(folder)), tmp / "shards", tmp / "latents",
                   EncodeOptions(samples_per_shard=1024, batch_size=64))
    return tmp / "latents"


def ours(loader, epoch: int) -> int:
    loader.set_epoch(epoch)
    return sum(len(b.mean) for b in loader)


def plain(out: Path, batch: int) -> int:
    """The README's lines, shuffled with a 5,000-sample buffer and batched as a trainer would."""
    index = read_index(out)
    urls = [str(out / s.name) for s in index.splits["train"].shards]
    seen = 0
    for mean, std, labels in (wds.WebDataset(urls, shardshuffle=100, seed=0).shuffle(5000).decode()
                              .to_tuple("mean.npy", "std.npy", "cls").batched(batch, partial=True)):
        mean, std = restored(np.asarray(mean), index.dtype), restored(np.asarray(std), index.dtype)
        labels = torch.as_tensor(np.asarray(labels, np.int64))
        seen += len(mean)
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--side", type=int, default=128)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        out = make_latents(Path(tmp), args.images, args.side)
        made = time.perf_counter() - start
        streamed = pipeline.open_loader(out, "train", args.batch, resident="off", seed=0)
        resident = pipeline.open_loader(out, "train", args.batch, resident="on", seed=0)
        start = time.perf_counter()
        resident.load()  # once per run: the epochs below gather from memory
        loaded = time.perf_counter() - start
        arms = {"streamed": lambda r: ours(streamed, r), "resident": lambda r: ours(resident, r),
                "plain_webdataset": lambda r: plain(out, args.batch)}
        rates: dict[str, list[float]] = {name: [] for name in arms}
        for round_ in range(args.rounds):
            for name, arm in arms.items():
                start = time.perf_counter()
                seen = arm(round_)
                rates[name].append(seen / (time.perf_counter() - start))
        index = read_index(out)
    best = {name: max(r) for name, r in rates.items()}
    print(json.dumps({
        "images": args.images, "latent_shape": list(index.latent_shape), "dtype": index.dtype, "batch": args.batch,
        "best_of": args.rounds, "encode_s": round(made, 1),
        "resident_load_s": round(loaded, 2), "torch_threads": torch.get_num_threads(),
        "samples_per_s": {k: round(v) for k, v in best.items()},
        "streamed_over_plain": round(best["streamed"] / best["plain_webdataset"], 2),
        "resident_over_plain": round(best["resident"] / best["plain_webdataset"], 2),
    }, indent=2))


if __name__ == "__main__":
    main()
