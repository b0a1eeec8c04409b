"""The resident loader's two gathers on the same decoded MNIST tensor in the same process, alternated: one
index_select per batch (what `gather_for` picks on a CPU) against several batches per index_select (CUDA's).
Both run through the loader itself (`loader.gather`), so both carry the same per-batch work (the epoch's order,
crop parameters, the `Batch`) and the ratio is the gathers' alone. Prints JSON with the ratio.

    .venv/bin/python bench/resident_gather.py [--batch 256 16384] [--device cpu|cuda] [--mnist DIR] [--rounds 3]
        [--threads N]

On a GPU the difference is kernel launches per batch (one index_select for images and one for labels, and the
index slice) against none; on a CPU both copy the same bytes, and the block gather measured slower (bench/LOG.md,
2026-12-07) except on a box loaded past its cores: each small index_select enters torch's thread pool, and with
its threads descheduled that costs more than the copy (with --threads 1 the per-batch gather ran 2.5-2.8x as
fast). Until that entry `per_batch` here was a bare index_select loop with none of the loader's work, timed
against the whole loader.
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
from pipeline.loader.resident import gather_for


def epoch(loader, gather: str) -> int:
    """One pass of the loader with `gather` ('batch' or 'block'); the images it handed out."""
    loader.gather = gather
    return sum(len(b.images) for b in loader)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 16384])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mnist", type=Path, default=tt.MNIST)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch's intra-op threads (default: torch's, one per core)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tt.MNIST = args.mnist
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tt.make_shards(Path(tmp), 60_000)
        for batch in args.batch:
            loader = pipeline.open_loader(Path(tmp) / "shards", "train", batch_size=batch, resident="on",
                                          device=args.device)
            loader.load()
            rates = {"per_batch": [], "blocks": []}
            for _ in range(args.rounds):
                for name, gather in (("per_batch", "batch"), ("blocks", "block")):
                    tt.sync(args.device)
                    start = time.perf_counter()
                    seen = epoch(loader, gather)
                    tt.sync(args.device)
                    rates[name].append(seen / (time.perf_counter() - start))
            best = {k: max(v) for k, v in rates.items()}
            rows.append({"batch": batch, "per_batch_img_s": round(best["per_batch"]),
                         "blocks_img_s": round(best["blocks"]), "blocks_over_per_batch":
                         round(best["blocks"] / best["per_batch"], 2)})
    print(json.dumps({"device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "best_of": args.rounds, "chosen": gather_for(torch.device(args.device)), "runs": rows}, indent=2))



if __name__ == "__main__":
    main()
