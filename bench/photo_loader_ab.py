"""Our in-process photo loader at this checkout against the same loader at an earlier revision, same run.

`git archive` extracts the earlier revision's `pipeline/` to a temporary directory; one JPEG tree (as
bench/photo_loader.py builds it) is ingested once by this checkout (the shard format is shared). Then the two
loaders and torchvision's decode loop take turns, `--rounds` times, each in a fresh subprocess with one thread,
so a load spike on the shared cores hits both alike. Prints JSON: the best images per wall second and per CPU
second of each, and the ratios.

    .venv/bin/python bench/photo_loader_ab.py --rev 081ef38 [--images 1500] [--side 256] [--rounds 3] [--workers 0]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

CHILD = """
import sys, time, json, torch
torch.set_num_threads(1)
sys.path.insert(0, {bench!r})
import photo_loader as pl
from pathlib import Path
pl.torchvision_loop([])
what, target = sys.argv[1], Path(sys.argv[2])
if what == "torchvision":
    files = sorted(target.rglob("*.jpg"))
    fn, n = (lambda: pl.torchvision_loop(files)), len(files)
else:
    import pipeline
    loader = pipeline.open_loader(target, "train", batch_size=pl.BATCH, workers=int(sys.argv[3]), resident="off",
                                  drop_last=False)
    fn, n = (lambda: sum(len(b.images) for b in loader)), loader.num_samples
fn()  # warm: page cache, imports
wall, cpu = time.perf_counter(), time.process_time()
fn()
print(json.dumps({{"wall": n / (time.perf_counter() - wall), "cpu": n / (time.process_time() - cpu)}}))  # cpu: this
# process only, so a per-CPU-second figure means something in process (--workers 0) alone
"""


def child(what: str, target: Path, src: Path, workers: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    code = CHILD.format(bench=str(HERE))
    out = subprocess.run([sys.executable, "-c", code, what, str(target), str(workers)], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", required=True, help="the earlier revision (git), the baseline")
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0, help="the loaders' data.workers (0: in process)")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    import photo_loader as pl

    import pipeline

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        old = tmp / "old"
        old.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.rev, "pipeline"], capture_output=True,
                                 check=True).stdout
        (tmp / "old.tar").write_bytes(archive)
        with tarfile.open(tmp / "old.tar") as tar:
            tar.extractall(old, filter="data")
        tree = pl.photo_tree(tmp / "tree", args.images, args.side)
        shards = tmp / "shards"
        pipeline.ingest("imagefolder", {"root": str(tree)}, shards, samples_per_shard=1024, block_size=1,
                        progress=False)
        runs = {"torchvision": (tree, ROOT), "before": (shards, old), "after": (shards, ROOT)}
        best = {name: {"wall": 0.0, "cpu": 0.0} for name in runs}
        start = time.perf_counter()
        for _ in range(args.rounds):
            for name, (target, src) in runs.items():
                got = child(name if name == "torchvision" else "loader", target, src, args.workers)
                best[name] = {k: max(best[name][k], got[k]) for k in got}
    report = {"rev": args.rev, "images": args.images, "side": args.side, "rounds": args.rounds, "workers": args.workers,
              "seconds": round(time.perf_counter() - start, 1),
              **{f"{name}_{k}": round(v) for name, d in best.items() for k, v in d.items()}}
    for k in ("wall", "cpu"):
        report[f"after_over_before_{k}"] = round(best["after"][k] / best["before"][k], 3)
        report[f"before_over_ceiling_{k}"] = round(best["before"][k] / best["torchvision"][k], 3)
        report[f"after_over_ceiling_{k}"] = round(best["after"][k] / best["torchvision"][k], 3)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
