"""WebDataset shards as img2dataset writes them, from real photographs (scikit-image's and scikit-learn's bundled
images), written with webdataset's TarWriter:

    {n:05d}.tar          {key}.jpg, {key}.txt (caption), {key}.json (metadata), for the inputs that downloaded
    {n:05d}_stats.json   count, successes, failed_to_download, ... (img2dataset's logger.write_stats)
    {n:05d}.parquet      every input row with its status (when pyarrow is installed)

Keys are img2dataset's: the shard number then the input's number within the shard, so the inputs that "failed to
download" (every `fail_every`-th) leave gaps in the keys, as they do there.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image


@functools.cache
def _bundled_photos() -> tuple[np.ndarray, ...]:
    import skimage.data
    from sklearn.datasets import load_sample_images

    return (skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket(),
            *load_sample_images().images)


def photos(n: int, size: int = 128) -> list[np.ndarray]:
    """`n` distinct RGB (size, size, 3) uint8 crops of the bundled photographs."""
    out = []
    sources = _bundled_photos()
    for i in range(n):
        photo = Image.fromarray(sources[i % len(sources)])
        scale = 2 * size / min(photo.size)  # the shorter side to 2 x size, then one of a grid of crops
        photo = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.Resampling.LANCZOS)
        step = i // len(sources)
        left, top = (step * size // 3) % (photo.width - size), (step * size // 2) % (photo.height - size)
        out.append(np.asarray(photo.crop((left, top, left + size, top + size))))
    return out


def jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@dataclass(frozen=True)
class Written:
    key: str
    shard: Path
    jpg: bytes
    caption: str


def write_img2dataset(out: Path, images: list[np.ndarray], per_shard: int = 8, fail_every: int = 5,
                      stats: bool = True, replace: dict[int, bytes] | None = None,
                      captions: dict[int, str] | None = None) -> list[Written]:
    """The inputs `images` (plus a failed download every `fail_every`-th input) as img2dataset shards of
    `per_shard` inputs each under `out`; returns what went into the tars, in order. `replace`: image number ->
    the bytes stored as its .jpg instead (a corrupt member); `captions`: image number -> its caption instead of
    "photo {key}"."""
    out.mkdir(parents=True, exist_ok=True)
    images = iter(images)
    written: list[Written] = []
    for shard_id in itertools.count():
        rows, sink = [], None
        for i in range(per_shard):
            key = f"{shard_id:05d}{i:04d}"
            failed = (shard_id * per_shard + i) % fail_every == fail_every - 1
            image = None if failed else next(images, None)
            if not failed and image is None:
                break
            caption = (captions or {}).get(len(written), f"photo {key}")
            row = {"url": f"https://example.com/{key}.jpg", "key": key, "caption": caption,
                   "status": "failed_to_download" if failed else "success",
                   "error_message": "HTTP 404" if failed else None,
                   "width": None if failed else image.shape[1], "height": None if failed else image.shape[0]}
            rows.append(row)
            if failed:
                continue
            if sink is None:
                sink = wds.TarWriter(str(out / f"{shard_id:05d}.tar"))
            data = (replace or {}).get(len(written)) or jpeg(image)
            sink.write({"__key__": key, "jpg": data, "txt": row["caption"], "json": json.dumps(row, indent=4)})
            written.append(Written(key, out / f"{shard_id:05d}.tar", data, row["caption"]))
        if sink is None:
            return written
        sink.close()
        if stats:
            successes = sum(r["status"] == "success" for r in rows)
            (out / f"{shard_id:05d}_stats.json").write_text(json.dumps({
                "count": len(rows), "successes": successes, "failed_to_download": len(rows) - successes,
                "failed_to_resize": 0, "duration": 0.1,
                "status_dict": {"success": successes, "HTTP 404": len(rows) - successes},
            }, indent=4))
        _parquet(out / f"{shard_id:05d}.parquet", rows)
    return written


def _parquet(path: Path, rows: list[dict]) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # the source never reads it; it is here because img2dataset writes it
        return
    pq.write_table(pa.Table.from_pylist(rows), path)
