"""Loader throughput: packed shards (ours) vs one image per tar member (the usual WebDataset layout).

Prints JSON with samples/s for each and their ratio. Data: real MNIST from ../shared/data/mnist when present,
else the bundled digits. Single process, so the figures are per core.

    .venv/bin/python bench/loader.py
"""

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds

import pipeline

MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


def per_member_shards(images: np.ndarray, labels: np.ndarray, out: Path) -> list[str]:
    """Baseline layout: one .npy image and one .cls label per sample, 10,000 samples per shard."""
    with wds.ShardWriter(str(out / "baseline-%06d.tar"), maxcount=10_000, verbose=0) as sink:
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            buf = io.BytesIO()
            np.save(buf, image)
            sink.write({"__key__": f"{i:07d}", "npy": buf.getvalue(), "cls": int(label)})
    return sorted(str(p) for p in out.glob("baseline-*.tar"))


def rate(iterate, n_expected: int) -> float:
    start = time.perf_counter()
    n = iterate()
    elapsed = time.perf_counter() - start
    assert n == n_expected, (n, n_expected)
    return n / elapsed


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if MNIST.is_dir():
            name, options = "idx", {"root": str(MNIST)}
        else:
            name, options = "digits", {}
        pipeline.ingest(name, options, tmp / "packed", progress=False)
        images, labels = pipeline.read_split(tmp / "packed", "train")
        n = len(images)
        urls = per_member_shards(images, labels, tmp)
        loader = pipeline.ShardLoader(tmp / "packed", "train", batch_size=256, drop_last=False)

        def packed() -> int:
            return sum(len(b.images) for b in loader)

        def baseline() -> int:
            dataset = wds.WebDataset(urls, shardshuffle=False).decode().to_tuple("npy", "cls").batched(256)
            return sum(len(batch[0]) for batch in dataset)

        packed_rate = rate(packed, n)
        baseline_rate = rate(baseline, n)
    print(json.dumps({
        "dataset": name, "samples": n, "image_shape": list(images.shape[1:]),
        "packed_samples_per_s": round(packed_rate), "per_member_samples_per_s": round(baseline_rate),
        "ratio": round(packed_rate / baseline_rate, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
