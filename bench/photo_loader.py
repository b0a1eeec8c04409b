"""Photo loader throughput: a real JPEG tree at 256 px (and 512 px), our loader against the decode ceiling and
the loaders people use, in the same run.

Data: crops of the two photographs scikit-learn ships (427x640), cut at random places and scales, resized to
the side, mirrored at random, saved as JPEG q90 (offline, real photos). Prints JSON: images/s for each reader,
the shard/source byte ratio of the ingest (untouched JPEGs are kept byte for byte; the default encoded-blocks
layout, and one photo per sample for comparison), and the goal ratios. WebDataset's own loader reads the
one-photo-per-sample shards, the layout it decodes without help.

    .venv/bin/python bench/photo_loader.py [--images 3000] [--side 256] [--big 500] [--big-batch 64] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

BATCH = 256


def photo_tree(root: Path, n: int, side: int, seed: int = 0) -> Path:
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    for i in range(n):
        photo = photos[i % len(photos)]
        size = int(rng.integers(min(side, 200), min(photo.shape[:2]) + 1))
        top, left = rng.integers(0, photo.shape[0] - size + 1), rng.integers(0, photo.shape[1] - size + 1)
        image = Image.fromarray(photo[top : top + size, left : left + size]).resize((side, side), Image.LANCZOS)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        path = root / ("china" if i % 2 == 0 else "flower") / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=90)
    return root


def rate(fn, n: int, epochs: int, clock=time.perf_counter) -> float:
    """Images/s of the best of `epochs` passes (the first also warms the page cache and worker start-up).
    clock=time.process_time counts this process's CPU seconds instead: images per core-second of work done in
    process, which other engineers' load on the shared cores disturbs far less than the wall clock."""
    best = float("inf")
    for _ in range(epochs):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return n / best


def pillow_loop(files: list[Path]) -> None:
    for path in files:
        with Image.open(path) as image:
            np.asarray(image.convert("RGB"))


def torchvision_loop(files: list[Path]) -> None:
    from torchvision.io import ImageReadMode, decode_jpeg

    for path in files:
        decode_jpeg(torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8), mode=ImageReadMode.RGB)


def _decode_process(files: list[Path], start, done) -> None:
    torch.set_num_threads(1)
    torchvision_loop(files[:64])  # imports and warm caches before the common start
    start.wait()
    torchvision_loop(files)
    done.put(None)


def parallel_ceiling(files: list[Path], processes: int, epochs: int) -> float:
    """Images/s of `processes` torchvision decode loops over the files at once, one per process (best of
    `epochs`): the ceiling of this many cores together, which N loader workers are measured against (two cores
    of a VM can share a physical core, or memory bandwidth, and then give less than twice one)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    best = 0.0
    for _ in range(epochs):
        start, done = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_decode_process, args=(files, start, done)) for _ in range(processes)]
        for proc in procs:
            proc.start()
        time.sleep(2.0)  # every process warmed up and waiting
        began = time.perf_counter()
        start.set()
        for _ in procs:
            done.get()
        best = max(best, processes * len(files) / (time.perf_counter() - began))
        for proc in procs:
            proc.join()
    return best


def ours(out: Path, workers: int, reuse: bool = True, batch: int = BATCH) -> callable:
    """Our streamed loader; reuse=False allocates every batch afresh (the loader before its buffer pool)."""
    import pipeline
    from pipeline.loader.read import BatchPool

    loader = pipeline.open_loader(out, "train", batch_size=batch, workers=workers, resident="off", drop_last=False)
    if not reuse:
        loader._batch_pool = lambda: BatchPool(0, 0)  # keeps no buffer: each batch is a new allocation
    return lambda: sum(len(b.images) for b in loader)


def steady_rate(out: Path, workers: int, batch: int, epochs: int) -> float:
    """Images/s of our loader between its workers' first batches and its last (best of `epochs`): the rate a
    long epoch runs at, without an epoch's start (forking the workers, the first batch decoded with nothing to
    overlap), which a 3,000-photo epoch of a dozen batches counts in full."""
    import pipeline

    loader = pipeline.open_loader(out, "train", batch_size=batch, workers=workers, resident="off", drop_last=False)
    best = 0.0
    for _ in range(epochs):
        stamps, sizes = [], []
        for b in loader:
            stamps.append(time.perf_counter())
            sizes.append(len(b.images))
        if len(stamps) > workers + 1:
            best = max(best, sum(sizes[workers + 1 :]) / (stamps[-1] - stamps[workers]))
    return best


def imagefolder_loader(root: Path, workers: int) -> callable:
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import PILToTensor

    dataset = ImageFolder(str(root), transform=PILToTensor())
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers)
    return lambda: sum(len(x) for x, _ in loader)


def webdataset_loader(out: Path, workers: int) -> callable:
    import webdataset as wds

    urls = sorted(str(p) for p in out.glob("train-*.tar"))
    dataset = (wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("torchrgb8")
               .to_tuple("jpg", "cls").batched(BATCH))
    loader = wds.WebLoader(dataset, batch_size=None, num_workers=workers)
    return lambda: sum(len(x) for x, _ in loader)


def measure(tmp: Path, n: int, side: int, epochs: int, worker_counts: list[int], baselines: bool,
            batch: int = BATCH) -> dict:
    import pipeline

    root = photo_tree(tmp / f"tree-{side}", n, side)
    out = tmp / f"shards-{side}"
    start = time.perf_counter()
    index = pipeline.ingest("imagefolder", {"root": str(root)}, out, samples_per_shard=1024, progress=False)
    ingest_s = time.perf_counter() - start
    # the layout before encoded-blocks became the default, for its byte ratio: one photo per tar sample
    single = pipeline.ingest("imagefolder", {"root": str(root)}, tmp / f"single-{side}", samples_per_shard=1024,
                             layout="encoded", progress=False)
    files = sorted(root.rglob("*.jpg"))
    source_bytes = sum(p.stat().st_size for p in files)
    shard_bytes = sum(s.bytes for s in index.splits["train"].shards)
    result = {
        "images": n, "side": side, "batch": batch, "ingest_s": round(ingest_s, 2),
        "ingest_images_per_s": round(n / ingest_s),
        "layout": index.layout, "images_per_block": index.block_size,
        "shard_over_source_bytes": round(shard_bytes / source_bytes, 4),
        "one_photo_per_sample_shard_over_source_bytes": round(
            sum(s.bytes for s in single.splits["train"].shards) / source_bytes, 4),
        "pillow_decode_per_core": round(rate(lambda: pillow_loop(files), n, epochs)),
        "torchvision_decode_per_core": round(rate(lambda: torchvision_loop(files), n, epochs)),
    }
    result["ours_0_workers_fresh_batches"] = round(rate(ours(out, 0, reuse=False, batch=batch), n, epochs))
    reuse_checked = False
    # the same three in process, per CPU second (the per-core figure under a shared machine's load)
    cpu = time.process_time
    result["torchvision_decode_per_cpu_s"] = round(rate(lambda: torchvision_loop(files), n, epochs, cpu))
    result["ours_0_workers_per_cpu_s"] = round(rate(ours(out, 0, batch=batch), n, epochs, cpu))
    result["ours_0_workers_fresh_batches_per_cpu_s"] = round(rate(ours(out, 0, reuse=False, batch=batch), n, epochs,
                                                                  cpu))
    result["ours_in_process_over_torchvision_ceiling_cpu"] = round(result["ours_0_workers_per_cpu_s"] /
                                                                    result["torchvision_decode_per_cpu_s"], 3)
    for workers in worker_counts:
        result[f"ours_{workers}_workers"] = round(rate(ours(out, workers, batch=batch), n, epochs))
        if workers:
            result[f"ours_{workers}_workers_steady"] = round(steady_rate(out, workers, batch, epochs))
            result[f"torchvision_decode_{workers}_processes"] = round(parallel_ceiling(files, workers, epochs))
            result[f"ours_{workers}_workers_steady_over_{workers}_process_ceiling"] = round(
                result[f"ours_{workers}_workers_steady"] / result[f"torchvision_decode_{workers}_processes"], 3)
            result[f"ours_{workers}_workers_over_{workers}_process_ceiling"] = round(
                result[f"ours_{workers}_workers"] / result[f"torchvision_decode_{workers}_processes"], 3)
            if not reuse_checked and workers == max(worker_counts):
                reuse_checked = True  # the buffer pool's worth with workers: fresh shared memory per batch instead
                fresh = ours(out, workers, reuse=False, batch=batch)
                result[f"ours_{workers}_workers_fresh_batches"] = round(rate(fresh, n, epochs))
        if baselines and workers:
            result[f"imagefolder_dataloader_{workers}_workers"] = round(rate(imagefolder_loader(root, workers), n,
                                                                             epochs))
            single_dir = tmp / f"single-{side}"
            result[f"webdataset_webloader_{workers}_workers"] = round(rate(webdataset_loader(single_dir, workers), n,
                                                                           epochs))
    one = result.get("ours_1_workers")
    result["ours_in_process_over_torchvision_ceiling"] = round(result["ours_0_workers"] /
                                                                result["torchvision_decode_per_core"], 3)
    result["fresh_batches_in_process_over_torchvision_ceiling"] = round(
        result["ours_0_workers_fresh_batches"] / result["torchvision_decode_per_core"], 3)
    result["pooled_over_fresh_batches_in_process"] = round(result["ours_0_workers"] /
                                                           result["ours_0_workers_fresh_batches"], 3)
    if one:
        result["ours_1_worker_over_torchvision_ceiling"] = round(one / result["torchvision_decode_per_core"], 3)
        if "ours_2_workers" in result:
            result["ours_2_over_1_workers"] = round(result["ours_2_workers"] / one, 2)
            for name in ("imagefolder_dataloader", "webdataset_webloader"):
                if f"{name}_2_workers" in result:
                    result[f"ours_over_{name}_at_2_workers"] = round(result["ours_2_workers"] /
                                                                     result[f"{name}_2_workers"], 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--big", type=int, default=500, help="images of the 512-px set (0: skip it)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--big-batch", type=int, default=64, help="batch size of the 512-px set (a 256-photo batch "
                        "is 200 MB there, and 500 photos would make two batches an epoch)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    workers = sorted({0, 1, 2, cores})
    torch.set_num_threads(1)
    torchvision_loop([])  # imports torchvision's codecs before any timing
    with tempfile.TemporaryDirectory() as tmp:
        report = {"cores": cores, "runs": [measure(Path(tmp), args.images, args.side, args.epochs, workers, True)]}
        if args.big:
            report["runs"].append(measure(Path(tmp), args.big, 512, args.epochs, [0, 1, 2], False, args.big_batch))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
