"""Ingest throughput: all 70,000 MNIST images, the `ingest-dataset` flow on 2 worker processes, against a
single-process `webdataset.ShardWriter` loop writing one image per sample (what a tutorial does).

Prints JSON: seconds and images/s for each, and the ratio. Needs ../shared/data/mnist.

    .venv/bin/python bench/ingest.py [--workers 2]

`--photos N` measures the runners on photos instead: N JPEGs of 300-427 px cut from scikit-learn's two sample
photographs, ingested at 256x256 (`size_rule crop`: decode, Lanczos resize, centre crop, JPEG encode), in
shard groups of 64 (`--per-group`), by the flow's thread and process runners (alternating, `--rounds` times,
best kept) against `pipeline.ingest` in process (one core): which runner scales for decode+resize work.

    .venv/bin/python bench/ingest.py --photos 1024 --workers 2 [--rounds 2] [--per-group 64]

`--pool` measures the size of the thread pool instead: the default `ingest.workers` against 1, 2 and 4 workers
(`--arms`), on the photo tree above (`--photos`, `--per-group`) and on a many-group packed source (`shapes`,
`--shapes` samples in groups of `--shape-group`), alternating the arms' order each round, best wall kept. Per
arm: wall, the process's peak threads (sampled every 10 ms from /proc, the sampler included) and peak RSS
(VmHWM, reset before the arm; one process runs every arm, so `rss_before_mb` says where it started and
`rss_growth_mb` how far above that the arm went), with the wall ratio of the best fixed count to the arm (above 1:
the arm is faster). Prefect's flow-run heartbeats are off while it runs (they round every flow's wall up to a whole
second). Linux only.

    .venv/bin/python bench/ingest.py --pool [--photos 512 --per-group 32] [--shapes 16000 --shape-group 128]
"""

import argparse
import io
import json
import os
import shutil
import tempfile
import threading
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
    from flows.ingest_dataset import ingest_dataset
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


def proc_status(field: str) -> int:
    """One number of /proc/self/status (Threads, VmRSS and VmHWM in kB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class PeakThreads:
    """The most threads this process had while the `with` block ran, sampled every `period_s` (and once at exit)."""

    def __init__(self, period_s: float = 0.01) -> None:
        self.period_s, self.peak, self._stop = period_s, 0, threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.period_s):
            self.peak = max(self.peak, proc_status("Threads"))

    def __enter__(self) -> "PeakThreads":
        self.peak = proc_status("Threads")
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, proc_status("Threads"))


def measured(fn) -> dict:
    """Wall seconds, peak threads and peak RSS of `fn()`, the RSS peak reset first (writing 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")
    rss_before = proc_status("VmRSS")
    with PeakThreads() as threads:
        start = time.perf_counter()
        fn()
        wall = time.perf_counter() - start
    return {"wall_s": wall, "peak_threads": threads.peak, "peak_rss_mb": proc_status("VmHWM") / 1024,
            "rss_before_mb": rss_before / 1024}


def pool_sizes(args) -> dict:
    """Each arm of `args.arms` on the photo tree and on the shapes source; see the module docstring."""
    from prefect.logging import disable_run_logger
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    import pipeline
    from flows.ingest_dataset import ingest_dataset
    from vae.config import IngestSection, SourceSection

    arms = [None if a == "default" else int(a) for a in args.arms.split(",")]
    label = {a: "default" if a is None else str(a) for a in arms}
    report = {"cpus": len(os.sched_getaffinity(0)), "rounds": args.rounds, "flow_heartbeats": False, "sources": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sources = {}
        if args.photos:
            sources["photos"] = (
                SourceSection(name="imagefolder", options={"root": str(photo_tree(tmp / "tree", args.photos))}),
                {"samples_per_shard": args.per_group, "image_size": (256, 256), "size_rule": "crop"})
        if args.shapes:
            sources["shapes"] = (
                SourceSection(name="shapes", options={"train_samples": args.shapes,
                                                      "test_samples": max(1, args.shapes // 16), "seed": 0}),
                {"samples_per_shard": args.shape_group, "block_size": args.shape_group})
        # Each flow run waits at its end for its heartbeat thread, which sleeps in steps of 1 s: every ingest's wall
        # came out as a whole second plus ~0.1 s whatever the arm, hiding differences under 1 s. Off here.
        with disable_run_logger(), temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            # the first flow pays for Prefect's temporary server: not timed
            ingest_dataset(SourceSection(), IngestSection(shard_dir=tmp / "warm", workers=1))
            for name, (source, settings) in sources.items():
                runs: dict[str, list[dict]] = {label[a]: [] for a in arms}
                for r in range(args.rounds):
                    for arm in arms if r % 2 == 0 else arms[::-1]:
                        out = tmp / f"{name}-{label[arm]}-{r}"
                        section = IngestSection(shard_dir=out, workers=arm, **settings)
                        runs[label[arm]].append(measured(lambda s=source, i=section: ingest_dataset(s, i)))
                        index = pipeline.read_index(out)
                        groups = sum(len(split.shards) for split in index.splits.values())
                        shutil.rmtree(out)  # the next arm writes afresh; the disk holds one copy at a time
                report["sources"][name] = {"options": source.options | settings, "shard_groups": groups,
                                           **summary(runs, label)}
    return report


def summary(runs: dict[str, list[dict]], label: dict) -> dict:
    """Per arm: best wall, most threads, largest RSS peak over the rounds; wall ratio of the best fixed count."""
    from flows.ingest_dataset import pool_size
    from vae.config import IngestSection

    arms = {}
    for name, rounds in runs.items():
        arms[name] = {"wall_s": round(min(r["wall_s"] for r in rounds), 2),
                      "walls_s": [round(r["wall_s"], 2) for r in rounds],
                      "peak_threads": max(r["peak_threads"] for r in rounds),
                      "peak_rss_mb": round(max(r["peak_rss_mb"] for r in rounds)),
                      "rss_before_mb": round(max(r["rss_before_mb"] for r in rounds)),
                      "rss_growth_mb": round(max(r["peak_rss_mb"] - r["rss_before_mb"] for r in rounds))}
    fixed = [a for a in label.values() if a != "default"]
    best = min(fixed, key=lambda a: arms[a]["wall_s"]) if fixed else None
    for arm in arms.values():
        arm["best_fixed_over_arm"] = round(arms[best]["wall_s"] / arm["wall_s"], 2) if best else None
    return {"default_workers": pool_size(IngestSection())[0], "best_fixed": best, "arms": arms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--photos", type=int, default=0, help="measure the runners on this many photos instead")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--per-group", type=int, default=64, help="photos per shard group (a task) with --photos")
    parser.add_argument("--pool", action="store_true", help="measure the thread pool's size (see above)")
    parser.add_argument("--arms", default="default,1,2,4", help="with --pool: worker counts, 'default' the config's")
    parser.add_argument("--shapes", type=int, default=16000, help="with --pool: train samples of shapes (0: none)")
    parser.add_argument("--shape-group", type=int, default=128, help="with --pool: shapes samples per shard group")
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if args.pool:
        print(json.dumps(pool_sizes(args), indent=2))
        return
    if args.photos:
        print(json.dumps(photo_runners(args.photos, args.workers, args.rounds, args.per_group), indent=2))
        return
    if not MNIST.is_dir():
        raise SystemExit(f"real MNIST not found at {MNIST}")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.logging import disable_run_logger

    from flows.ingest_dataset import ingest_dataset
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
