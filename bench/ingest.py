"""Ingest throughput: all 70,000 MNIST images, the `ingest-dataset` flow on 2 worker processes, against a
single-process `webdataset.ShardWriter` loop writing one image per sample (what a tutorial does).

Prints JSON: seconds and images/s for each, and the ratio. Needs ../shared/data/mnist.

    .venv/bin/python bench/ingest.py [--workers 2]
"""

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds

MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


def shardwriter_loop(out: Path) -> int:
    """The baseline, timed from the IDX files: decode, then one .npy + .cls sample per image."""
    from pipeline.sources.idx import _read_idx, read_idx

    _read_idx.cache_clear()
    n = 0
    with wds.ShardWriter(str(out / "mnist-%06d.tar"), maxcount=10_000, verbose=0) as sink:
        for stem in ("train", "t10k"):
            images = read_idx(MNIST / f"{stem}-images-idx3-ubyte.gz")
            labels = read_idx(MNIST / f"{stem}-labels-idx1-ubyte.gz")
            for i in range(len(images)):
                buf = io.BytesIO()
                np.save(buf, images[i][..., None])
                sink.write({"__key__": f"{stem}-{i:06d}", "npy": buf.getvalue(), "cls": int(labels[i])})
                n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    if not MNIST.is_dir():
        raise SystemExit(f"real MNIST not found at {MNIST}")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.logging import disable_run_logger

    from flows.ingest import ingest_dataset
    from vae.config import IngestSection, SourceSection

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        n = shardwriter_loop(tmp)
        baseline_s = time.perf_counter() - start

        source = SourceSection(name="idx", options={"root": str(MNIST)})
        flow_s = {}
        # the first run pays for Prefect's temporary server; the later ones show the ingest itself
        for label, runner in (("first_processes", "processes"), ("processes", "processes"), ("threads", "threads")):
            section = IngestSection(shard_dir=tmp / label, runner=runner, workers=args.workers)
            with disable_run_logger():
                start = time.perf_counter()
                ingest_dataset(source, section)
                flow_s[label] = time.perf_counter() - start

        import pipeline

        start = time.perf_counter()
        pipeline.ingest("idx", source.options, tmp / "inprocess", progress=False)
        inprocess_s = time.perf_counter() - start
        index = pipeline.read_index(tmp / "threads")
        groups = sum(len(s.shards) for s in index.splits.values())
    print(json.dumps({
        "images": n, "shard_groups": groups, "workers": args.workers,
        "shardwriter_loop_s": round(baseline_s, 2), "shardwriter_loop_images_per_s": round(n / baseline_s),
        **{f"flow_{k}_s": round(v, 2) for k, v in flow_s.items()},
        **{f"flow_{k}_images_per_s": round(n / v) for k, v in flow_s.items()},
        "in_process_ingest_s": round(inprocess_s, 2), "in_process_images_per_s": round(n / inprocess_s),
        **{f"flow_{k}_vs_shardwriter": round(baseline_s / v, 1) for k, v in flow_s.items()},
        "in_process_vs_shardwriter": round(baseline_s / inprocess_s, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
