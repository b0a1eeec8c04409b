"""Ingest throughput: all 70,000 MNIST images, the `ingest-dataset` flow on 2 worker processes, against a
single-process `webdataset.ShardWriter` loop writing one image per sample (what a tutorial does).

Prints JSON: seconds and images/s for each, and the ratio. Needs ../shared/data/mnist.

    .venv/bin/python bench/ingest.py [--workers 2]

`--photos N` measures the runners on photos instead: N JPEGs of 300-427 px cut from scikit-learn's two sample
photographs, ingested at 256x256 (`size_rule crop`: decode, Lanczos resize, centre crop, JPEG encode), in
shard groups of 64 (`--per-group`), by the flow's thread and process runners (alternating, `--rounds` times,
best kept) against `pipeline.ingest` in process (one core): which runner scales for decode+resize work.

    .venv/bin/python bench/ingest.py --photos 1024 --workers 2 [--rounds 2] [--per-group 64]
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


def photo_tree(root: Path, n: int, seed: int = 0) -> Path:
    """`n` JPEGs (q90) of 300-427 px squares and 4:3 rectangles at random places in the two sample photographs."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two 427x640 RGB photographs
    rng = np.random.default_rng(seed)
    for i in range(n):
        photo = photos[i % 2]
        h = int(rng.integers(300, 428))
        w = min(photo.shape[1], h * (4 if i % 3 == 0 else 3) // 3)
        top, left = rng.integers(0, photo.shape[0] - h + 1), rng.integers(0, photo.shape[1] - w + 1)
        path = root / ("test" if i % 8 == 7 else "train") / ("china" if i % 2 == 0 else "flower") / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo[top : top + h, left : left + w]).save(path, quality=90)
    return root


def photo_runners(n: int, workers: int, rounds: int, per_group: int = 64) -> dict:
    from prefect.logging import disable_run_logger

    import pipeline
    from flows.ingest import ingest_dataset
    from vae.config import IngestSection, SourceSection

    settings = {"samples_per_shard": per_group, "image_size": (256, 256), "size_rule": "crop"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = photo_tree(tmp / "tree", n)
        source = SourceSection(name="imagefolder", options={"root": str(root)})
        best: dict[str, float] = {}

        def timed(label: str, fn) -> None:
            start = time.perf_counter()
            fn()
            best[label] = min(best.get(label, float("inf")), time.perf_counter() - start)

        with disable_run_logger():  # the first flow pays for Prefect's temporary server: not timed
            ingest_dataset(source, IngestSection(shard_dir=tmp / "warm", runner="threads", workers=workers,
                                                 **settings))
            for r in range(rounds):
                for runner in ("threads", "processes") if r % 2 == 0 else ("processes", "threads"):
                    section = IngestSection(shard_dir=tmp / f"{runner}-{r}", runner=runner, workers=workers, **settings)
                    timed(runner, lambda section=section: ingest_dataset(source, section))
                timed("in_process", lambda r=r: pipeline.ingest("imagefolder", source.options, tmp / f"one-{r}",
                                                                progress=False, **settings))
        groups = sum(len(s.shards) for s in pipeline.read_index(tmp / "threads-0").splits.values())
    report = {"photos": n, "per_group": per_group, "shard_groups": groups, "workers": workers, "rounds": rounds,
              **{f"{k}_s": round(v, 2) for k, v in best.items()},
              **{f"{k}_images_per_s": round(n / v) for k, v in best.items()}}
    for runner in ("threads", "processes"):
        report[f"{runner}_over_in_process"] = round(best["in_process"] / best[runner], 2)
    report["threads_over_processes"] = round(best["processes"] / best["threads"], 2)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--photos", type=int, default=0, help="measure the runners on this many photos instead")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--per-group", type=int, default=64, help="photos per shard group (a task) with --photos")
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if args.photos:
        print(json.dumps(photo_runners(args.photos, args.workers, args.rounds, args.per_group), indent=2))
        return
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
