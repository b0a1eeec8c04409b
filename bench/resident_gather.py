"""The resident loader's batches: one gather per batch (the loader before issue 17) against several batches per
gather (now), on the same decoded MNIST tensor in the same process, alternated. Prints JSON with the ratio.

    .venv/bin/python bench/resident_gather.py [--batch 256 16384] [--device cpu|cuda] [--mnist DIR] [--rounds 3]

On a GPU the difference is kernel launches per batch (one index_select for images and one for labels, and the
index slice) against none; on a CPU both are memory copies of the same bytes, so expect no gain there.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import train_throughput as tt

import pipeline
from pipeline.loader.base import generator


def blocks(loader) -> int:
    return sum(len(b.images) for b in loader)


def per_batch(loader) -> int:
    """The loader's batches as the per-batch gather produced them (pipeline/loader/resident.py at 081ef38)."""
    images, labels, _ = loader.load()
    n = len(images)
    perm = torch.randperm(n, generator=generator(loader.seed, loader.epoch))
    perm = perm[torch.arange(loader.start, loader.stop) % n]
    mine = perm[torch.randperm(len(perm), generator=generator(loader.seed, loader.epoch, loader.rank, 1))]
    mine = mine.to(loader.device)
    seen = 0
    for b in range(loader.batch_count(len(mine))):
        idx = mine[b * loader.batch_size : (b + 1) * loader.batch_size]
        seen += len(images.index_select(0, idx)) + 0 * len(labels.index_select(0, idx))
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 16384])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mnist", type=Path, default=tt.MNIST)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    tt.MNIST = args.mnist
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tt.make_shards(Path(tmp), 60_000)
        for batch in args.batch:
            loader = pipeline.ShardLoader(Path(tmp) / "shards", "train", batch_size=batch, resident="on",
                                          device=args.device)
            loader.load()
            rates = {"per_batch": [], "blocks": []}
            for _ in range(args.rounds):
                for name, run in (("per_batch", per_batch), ("blocks", blocks)):
                    tt.sync(args.device)
                    start = time.perf_counter()
                    seen = run(loader)
                    tt.sync(args.device)
                    rates[name].append(seen / (time.perf_counter() - start))
            best = {k: max(v) for k, v in rates.items()}
            rows.append({"batch": batch, "per_batch_img_s": round(best["per_batch"]),
                         "blocks_img_s": round(best["blocks"]), "blocks_over_per_batch":
                         round(best["blocks"] / best["per_batch"], 2)})
    print(json.dumps({"device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "best_of": args.rounds, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
