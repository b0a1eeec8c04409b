"""The `webdataset` source on img2dataset-style shards: read and ingest speed, and shard bytes against the source's.

Writes N JPEGs (side px, quality 90, cut from scikit-learn's two sample photographs) as img2dataset shards
(`{n:05d}.tar` with `.jpg`, `.txt`, `.json`, and `_stats.json`), and the same files as a folder. Then, alternating
the arms `--rounds` times and keeping each one's best, in this process:

- `webdataset_pil`: `webdataset.WebDataset` over the shards with Pillow decoding each `.jpg` (what one writes by
  hand: the baseline for the source's own cost);
- `source`: `WebDatasetSource.records` (the same reading and decoding, plus the checks and the kept bytes);
- `ingest_webdataset` / `ingest_imagefolder`: `pipeline.ingest` of the shards / of the folder (default layout,
  encoded-blocks, JPEG bytes kept).

Prints JSON: images/s (wall and per CPU-second of this process) per arm, the ratios to the baseline, and our
shards' bytes against the source tars and against the JPEG bytes alone.

    .venv/bin/python bench/webdataset_source.py [--images 2048] [--side 256] [--per-shard 256] [--rounds 3]
"""

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

import pipeline
from pipeline.sources.webdataset import WebDatasetConfig, WebDatasetSource


def write_inputs(root: Path, n: int, side: int, per_shard: int, seed: int = 0) -> tuple[Path, Path, int]:
    """(shard dir, folder, JPEG bytes): the same N JPEGs as img2dataset shards and as files."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    shards, folder = root / "i2d", root / "folder"
    shards.mkdir()
    folder.mkdir()
    total = 0
    for first in range(0, n, per_shard):
        shard_id = first // per_shard
        count = min(per_shard, n - first)
        with wds.TarWriter(str(shards / f"{shard_id:05d}.tar")) as sink:
            for i in range(first, first + count):
                photo = photos[i % len(photos)]
                size = int(rng.integers(min(side, 200), min(photo.shape[:2]) + 1))
                top, left = rng.integers(0, photo.shape[0] - size + 1), rng.integers(0, photo.shape[1] - size + 1)
                image = Image.fromarray(photo[top:top + size, left:left + size]).resize((side, side), Image.LANCZOS)
                buf = io.BytesIO()
                image.save(buf, format="JPEG", quality=90)
                key = f"{shard_id:05d}{i - first:04d}"
                meta = {"key": key, "status": "success", "width": side, "height": side}
                sink.write({"__key__": key, "jpg": buf.getvalue(), "txt": f"photo {i}", "json": json.dumps(meta)})
                (folder / f"{key}.jpg").write_bytes(buf.getvalue())
                total += len(buf.getvalue())
        (shards / f"{shard_id:05d}_stats.json").write_text(json.dumps({"count": count, "successes": count}))
    return shards, folder, total


def webdataset_pil(urls: list[str]) -> int:
    n = 0
    for sample in wds.WebDataset(urls, shardshuffle=False):
        np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
        n += 1
    return n


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--per-shard", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-wds-") as tmp:
        root = Path(tmp)
        shards, folder, jpeg_bytes = write_inputs(root, args.images, args.side, args.per_shard)
        urls = sorted(str(p) for p in shards.glob("*.tar"))
        source = WebDatasetSource(WebDatasetConfig(urls=str(shards)))
        out = {name: root / f"out-{name}" for name in ("webdataset", "imagefolder")}
        arms = {
            "webdataset_pil": lambda: webdataset_pil(urls),
            "source": lambda: sum(1 for _ in source.records("train")),
            "ingest_webdataset": lambda: pipeline.ingest("webdataset", {"urls": str(shards)}, out["webdataset"],
                                                         overwrite=True, progress=False),
            "ingest_imagefolder": lambda: pipeline.ingest("imagefolder", {"root": str(folder)}, out["imagefolder"],
                                                          overwrite=True, progress=False),
        }
        best = {name: (float("inf"), float("inf")) for name in arms}
        for r in range(args.rounds):
            for name in (list(arms) if r % 2 == 0 else list(arms)[::-1]):
                wall, cpu = timed(arms[name])
                best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
        ours = {name: sum(s.bytes for s in pipeline.read_index(d).splits["train"].shards) for name, d in out.items()}
        tars = sum(Path(u).stat().st_size for u in urls)
    base_wall, base_cpu = best["webdataset_pil"]
    print(json.dumps({
        "images": args.images, "side": args.side, "shards": len(urls), "rounds": args.rounds,
        "images_per_s": {n: round(args.images / w) for n, (w, _) in best.items()},
        "images_per_cpu_s": {n: round(args.images / c) for n, (_, c) in best.items()},
        "cpu_vs_webdataset_pil": {n: round(c / base_cpu, 2) for n, (_, c) in best.items()},
        "wall_vs_webdataset_pil": {n: round(w / base_wall, 2) for n, (w, _) in best.items()},
        "bytes": {"source_tars": tars, "source_jpegs": jpeg_bytes, **{f"ours_{n}": b for n, b in ours.items()}},
        "ours_webdataset_vs_source_tars": round(ours["webdataset"] / tars, 3),
        "ours_webdataset_vs_jpegs": round(ours["webdataset"] / jpeg_bytes, 3),
    }, indent=2))


if __name__ == "__main__":
    main()
