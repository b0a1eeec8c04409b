"""ingest.max_pixels: one oversized image (a 30000x30000 PNG of one colour, 874 kB on disk, 900 MB decoded) among
real photographs sinks nothing. The folder's header survey leaves it out, and the folder, webdataset and hf sources
reject it from its header as 'oversized', listed in skipped.jsonl, under the ingest's policy: no
DecompressionBombError, and no pixel of it decoded."""

from __future__ import annotations

import io
import json
import warnings
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from support.data import one_colour_png
from support.img2dataset import jpeg, photos, write_img2dataset

import pipeline
from pipeline import IngestSection, SourceError
from pipeline.conform import BadImage, decode_source

N = 120  # photos: one bomb among them is under the default ingest.max_skip_fraction (1%)
SIZE = 48


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return one_colour_png(30000, 30000)


@pytest.fixture(scope="module")
def pictures() -> list[np.ndarray]:
    return photos(N, size=SIZE)


def _report(shard_dir) -> list[dict]:
    return [json.loads(line) for line in (shard_dir / "skipped.jsonl").read_text().splitlines()]


def _no_bomb_warnings(record) -> None:
    assert not [w for w in record if issubclass(w.category, Image.DecompressionBombWarning)]


def test_a_bomb_among_photos_in_a_folder_is_left_out_of_the_survey_and_skipped(tmp_path, bomb, pictures):
    root = tmp_path / "photos"
    root.mkdir()
    for i, picture in enumerate(pictures):
        (root / f"{i:04d}.jpg").write_bytes(jpeg(picture))
    (root / "0050-panorama.png").write_bytes(bomb)
    assert len(bomb) == 874_852
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert pipeline.build_source("imagefolder", {"root": str(root)}).shapes("train") == Counter(
            {(SIZE, SIZE, 3): N})
        index = pipeline.ingest("imagefolder", {"root": str(root)}, tmp_path / "shards", progress=False)
    _no_bomb_warnings(caught)
    assert index.splits["train"].num_samples == N and index.skipped == {"oversized": 1}
    (skip,) = _report(tmp_path / "shards")
    assert skip["key"] == "0050-panorama.png" and skip["kind"] == "oversized"
    assert "over ingest.max_pixels (89,478,485)" in skip["reason"] and "900000000 pixels" in skip["reason"]
    images, _ = pipeline.read_split(tmp_path / "shards", "train")
    assert images.shape == (N, SIZE, SIZE, 3)
    with pytest.raises(SourceError, match="input '0050-panorama.png' of split 'train' was rejected \\(oversized\\)"):
        pipeline.ingest("imagefolder", {"root": str(root)}, tmp_path / "fail", on_error="fail", progress=False)


def test_a_bomb_in_a_webdataset_shard_is_skipped_naming_its_shard(tmp_path, bomb, pictures):
    src = tmp_path / "i2d"
    written = write_img2dataset(src, pictures, per_shard=32, replace={70: bomb})
    index = pipeline.ingest("webdataset", {"urls": str(src)}, tmp_path / "shards", progress=False)
    assert index.splits["train"].num_samples == N - 1 and index.skipped == {"oversized": 1}
    (skip,) = _report(tmp_path / "shards")
    assert skip["key"] == written[70].key and f"in {written[70].shard}: {written[70].key}.jpg:" in skip["reason"]
    kept = [w.key for i, w in enumerate(written) if i != 70]
    assert [key for key, _ in pipeline.read_captions(tmp_path / "shards", "train")] == kept


def test_a_bomb_in_an_hf_dataset_is_skipped(tmp_path, bomb, pictures):
    datasets = pytest.importorskip("datasets", reason="the hf source's extra is not installed (pip install '.[hf]')")
    files = [jpeg(p) for p in pictures]
    files.insert(30, bomb)
    rows = {"image": [{"bytes": f, "path": None} for f in files]}
    datasets.Dataset.from_dict(rows, features=datasets.Features({"image": datasets.Image()})).save_to_disk(
        str(tmp_path / "saved"))
    index = pipeline.ingest("hf", {"path": str(tmp_path / "saved")}, tmp_path / "shards", progress=False)
    assert index.splits["train"].num_samples == N and index.skipped == {"oversized": 1}
    assert [s["key"] for s in _report(tmp_path / "shards")] == ["train-0000030"]
    images, _ = pipeline.read_split(tmp_path / "shards", "train")
    np.testing.assert_array_equal(images[:3], np.stack([np.asarray(Image.open(io.BytesIO(f))) for f in files[:3]]))


def test_max_pixels_is_settable_below_and_above_pillows_limit(tmp_path, pictures, monkeypatch):
    assert IngestSection().max_pixels == Image.MAX_IMAGE_PIXELS
    data = jpeg(pictures[0])
    assert decode_source(data, SIZE * SIZE)[0].shape == (SIZE, SIZE, 3)
    with pytest.raises(BadImage, match="is 48x48 \\(W x H\\), 2,304 pixels, over ingest.max_pixels \\(2,303\\)"):
        decode_source(data, SIZE * SIZE - 1)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses over 2,000 pixels from here on
    square = one_colour_png(60, 60)  # 3,600 pixels
    with pytest.raises(BadImage, match="over ingest.max_pixels \\(1,000\\).*3600 pixels"):
        decode_source(square, 1000)
    assert decode_source(square, 5000)[0].shape == (60, 60, 1)  # Pillow's limit raised to admit it
    assert Image.MAX_IMAGE_PIXELS == 5000
    src = tmp_path / "i2d"
    write_img2dataset(src, [*pictures[:20], photos(1, size=64)[0]])
    index = pipeline.ingest("webdataset", {"urls": str(src)}, tmp_path / "shards", max_pixels=SIZE * SIZE,
                            max_skip_fraction=0.1, progress=False)
    assert index.skipped == {"oversized": 1} and "is 64x64 (W x H)" in _report(tmp_path / "shards")[0]["reason"]
