"""Ingestion: layouts, bad inputs and their policies, the skip report, checksums, verify, fsspec destinations."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import webdataset as wds
from conftest import BIN, run
from PIL import Image

import pipeline
from pipeline import ShardFormatError, SourceError, open_loader
from pipeline.conform import resize


def _png(path, array, **save):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(path, **save)


def _images(n, shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


@pytest.fixture
def messy_folder(tmp_path):
    """8 good 6x6 RGB files plus one of every kind of bad input."""
    root = tmp_path / "messy"
    good = _images(8, (6, 6, 3))
    for i, image in enumerate(good):
        _png(root / "a" / f"good{i}.png", image)
    data = (root / "a" / "good0.png").read_bytes()
    (root / "a" / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "a" / "garbage.jpg").write_bytes(b"this is not a jpeg at all")
    (root / "a" / "dangling.png").symlink_to(root / "a" / "deleted-long-ago.png")
    _png(root / "b" / "bigger.png", _images(1, (9, 12, 3))[0])
    _png(root / "b" / "gray.png", _images(1, (6, 6, 1))[0])
    _png(root / "b" / "alpha.png", _images(1, (6, 6, 4))[0])
    return root, good


def test_bad_inputs_are_skipped_listed_and_counted(messy_folder, tmp_path):
    root, good = messy_folder
    out = tmp_path / "shards"
    index = pipeline.ingest("imagefolder", {"root": str(root)}, out, 4, 2, progress=False, max_skip_fraction=1.0)
    assert index.image_shape == (6, 6, 3) and index.splits["train"].num_samples == 8
    assert index.skipped == {"corrupt": 2, "unreadable": 1, "size": 1, "channels": 2}
    assert index.splits["train"].skipped == index.skipped and index.skipped_report == "skipped.jsonl"
    report = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    reasons = {r["key"]: (r["kind"], r["reason"]) for r in report}
    assert set(reasons) == {"a/truncated.png", "a/garbage.jpg", "a/dangling.png", "b/bigger.png", "b/gray.png",
                            "b/alpha.png"}
    assert "truncated" in reasons["a/truncated.png"][1]
    assert "is 9x12, the dataset is 6x6; set ingest.size_rule" in reasons["b/bigger.png"][1]
    assert "has 1 channel(s), the dataset has 3; set ingest.channel_rule=convert" in reasons["b/gray.png"][1]
    images, labels = pipeline.read_split(out, "train")
    np.testing.assert_array_equal(images, good)


def test_fail_policy_stops_at_the_first_bad_input_and_says_how_to_skip(messy_folder, tmp_path):
    root, _ = messy_folder
    with pytest.raises(SourceError, match=r"input 'a/dangling.png' of split 'train' was rejected \(unreadable\).*"
                                          "set ingest.on_error=skip"):
        pipeline.ingest("imagefolder", {"root": str(root)}, tmp_path / "out", 4, 2, progress=False, on_error="fail",
                        max_skip_fraction=1.0)
    assert not (tmp_path / "out" / "index.json").exists()


def test_size_and_channel_rules_convert_instead_of_skipping(messy_folder, tmp_path):
    root, good = messy_folder
    index = pipeline.ingest("imagefolder", {"root": str(root)}, tmp_path / "out", 4, 2, progress=False,
                            size_rule="crop", channel_rule="convert", image_size=(4, 4), channels=1,
                            max_skip_fraction=1.0)
    assert index.image_shape == (4, 4, 1)
    assert index.skipped == {"corrupt": 2, "unreadable": 1}  # only the undecodable inputs are left out
    assert index.splits["train"].num_samples == 11
    resized = pipeline.ingest("imagefolder", {"root": str(root)}, tmp_path / "out2", 4, 2, progress=False,
                              size_rule="resize", channel_rule="convert", max_skip_fraction=1.0)
    assert resized.image_shape == (6, 6, 3) and resized.splits["train"].num_samples == 11
    images, _ = pipeline.read_split(tmp_path / "out2", "train")
    np.testing.assert_array_equal(images[:8], good)  # images of the target shape pass untouched


def test_every_input_skipped_is_an_error_that_points_at_the_report(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "x.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(SourceError, match="yielded no readable image"):
        pipeline.ingest("imagefolder", {"root": str(root)}, tmp_path / "out", progress=False)
    with pytest.raises(SourceError, match=r"all 1 inputs were skipped \({'corrupt': 1}\), each listed in .*skipped"):
        pipeline.ingest("imagefolder", {"root": str(root)}, tmp_path / "out", progress=False, image_size=(4, 4),
                        channels=3)
    assert "x.png" in (tmp_path / "out" / "skipped.jsonl").read_text()
    assert not (tmp_path / "out" / "index.json").exists()


@pytest.mark.parametrize(("layout", "fmt", "ext"), [("packed", "png", "images.npy"), ("encoded", "png", "png"),
                                                    ("encoded", "jpeg", "jpg")])
def test_both_layouts_read_by_webdataset_gnu_tar_and_the_loader(tmp_path, layout, fmt, ext):
    ramp = np.arange(8)[:, None] * 12 + np.arange(8)[None, :] * 6  # smooth, so that JPEG stays close
    images = np.stack([np.stack([ramp + k, ramp + 2 * k, 255 - ramp - k], -1) for k in range(10)]).astype(np.uint8)
    np.save(tmp_path / "x.npy", images)
    np.save(tmp_path / "y.npy", np.arange(10))
    options = {"files": {"train": str(tmp_path / "x.npy")}, "labels": {"train": str(tmp_path / "y.npy")}}
    out = tmp_path / "out"
    index = pipeline.ingest("arrays", options, out, 4, 2, progress=False, layout=layout, image_format=fmt)
    assert index.layout == layout and len(index.splits["train"].shards) == 3
    listing = subprocess.run(["tar", "tf", str(out / "train-000000.tar")], capture_output=True, text=True,
                             check=True).stdout.split()
    assert any(name.endswith(f".{ext}") for name in listing)
    samples = list(wds.WebDataset([str(out / s.name) for s in index.splits["train"].shards],
                                  shardshuffle=False).decode("rgb8"))
    if layout == "packed":
        decoded = np.concatenate([s["images.npy"] for s in samples])
    else:
        decoded = np.stack([s[ext] for s in samples])
        assert [int(s["cls"]) for s in samples] == list(range(10))
    read, labels = pipeline.read_split(out, "train")
    assert labels.tolist() == list(range(10))
    if fmt == "jpeg":  # lossy, but close
        assert np.abs(read.astype(int) - images).mean() < 4 and np.abs(decoded.astype(int) - images).mean() < 4
    else:
        np.testing.assert_array_equal(read, images)
        np.testing.assert_array_equal(decoded, images)


def test_auto_layout_packs_small_and_encodes_large_images(tmp_path):
    for name, shape, expected in (("small", (28, 28, 1), "packed"), ("large", (80, 80, 3), "encoded-blocks")):
        np.save(tmp_path / f"{name}.npy", _images(3, shape))
        index = pipeline.ingest("arrays", {"files": {"train": str(tmp_path / f"{name}.npy")}}, tmp_path / name,
                                4, 2, progress=False)
        assert index.layout == expected


def test_verify_names_a_corrupt_shard_and_a_rerun_rewrites_only_its_group(digits_shards_copy):
    out = digits_shards_copy
    assert pipeline.verify(out) == []
    result = run([str(BIN / "vaepipe"), "verify", str(out)], timeout=120)
    assert result.returncode == 0 and "ok: every shard" in result.stdout
    shard = out / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF  # one flipped byte inside a block
    shard.write_bytes(bytes(data))
    problems = pipeline.verify(out)
    assert len(problems) == 1 and problems[0].startswith("train-000001.tar: sha256")
    result = run([str(BIN / "vaepipe"), "verify", str(out)], timeout=120)
    assert result.returncode == 1 and "BAD train-000001.tar: sha256" in result.stdout
    assert "re-run the ingest" in result.stderr
    with pytest.raises(ShardFormatError, match="train-000001.tar: sha256 .* does not match"):
        list(open_loader(out, "train", batch_size=64, shuffle=False, verify=True))
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    (out / "index.json").unlink()
    pipeline.ingest("digits", {}, out, 512, 128, progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert [n for n in before if before[n] != after[n]] == ["train-000001.tar"]
    assert pipeline.verify(out) == []


@pytest.fixture
def digits_shards_copy(digits_shards, tmp_path):
    import shutil

    return shutil.copytree(digits_shards, tmp_path / "digits")


def test_a_rerun_with_other_shard_settings_rewrites_and_drops_stale_shards(tmp_path):
    pipeline.ingest("digits", {}, tmp_path, 256, 128, progress=False)
    assert len(list(tmp_path.glob("train-*.tar"))) == 6
    (tmp_path / "index.json").unlink()
    index = pipeline.ingest("digits", {}, tmp_path, 512, 128, progress=False)
    assert sorted(p.name for p in tmp_path.glob("train-*.tar")) == [s.name for s in index.splits["train"].shards]
    assert len(index.splits["train"].shards) == 3


def test_s3_destination_round_trip(s3_server, tmp_path):
    import fsspec

    storage = {"endpoint_url": s3_server}
    url = "s3://shards/digits"
    index = pipeline.ingest("digits", {}, url, 512, 128, progress=False, storage_options=storage)
    fs = fsspec.filesystem("s3", **storage)
    names = {p.rsplit("/", 1)[1] for p in fs.ls("shards/digits")}
    assert {"index.json", "skipped.jsonl", *(s.name for s in index.splits["train"].shards)} <= names
    assert pipeline.verify(url, storage) == []
    pipeline.ingest("digits", {}, tmp_path / "local", 512, 128, progress=False)
    for split in ("train", "test"):
        for a, b in zip(pipeline.read_split(url, split, storage), pipeline.read_split(tmp_path / "local", split),
                        strict=True):
            np.testing.assert_array_equal(a, b)
    loader = open_loader(url, "train", batch_size=100, storage_options=storage, resident="off", verify=True)
    assert sum(len(b.images) for b in loader) == len(loader) * 100
    assert pipeline.ingest("digits", {}, url, 512, 128, storage_options=storage).created == index.created  # reused
    fs.rm_file("shards/digits/index.json")
    with pytest.raises(ShardFormatError, match="no index.json, so an ingest was interrupted"):
        open_loader(url, "train", batch_size=8, storage_options=storage)


@pytest.mark.parametrize("landscape", [True, False])
def test_crop_rule_scales_the_shorter_side_then_centre_crops(landscape):
    """size_rule crop: the shorter side goes to the target and the longer one is cut evenly on both sides, so a
    white centre square fills the whole output; stretching ('resize') keeps the black sides."""
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, 20:60] = 255  # the centre 40x40 square
    if not landscape:
        image = image.transpose(1, 0, 2).copy()  # 80x40, the square in the middle rows
    cropped = resize(image, (20, 20), "crop")
    stretched = resize(image, (20, 20), "resize")
    assert cropped.shape == stretched.shape == (20, 20, 3)
    assert cropped.min() > 230 and cropped.mean() > 250  # only the square (Lanczos sees the black at its rims)
    assert abs(stretched.mean() - 127.5) < 10  # half of it is the black sides


def test_crop_rule_is_antialiased():
    """Shrinking a one-pixel checkerboard 8x averages it to grey; sampling without a filter would keep pure
    black and white pixels (aliasing)."""
    board = ((np.indices((200, 200)).sum(0) % 2) * 255).astype(np.uint8)[..., None].repeat(3, axis=2)
    small = resize(board, (25, 25), "crop").astype(float)
    assert small.shape == (25, 25, 3)
    assert abs(small.mean() - 127.5) < 3 and small.std() < 3


def test_packed_shards_need_whole_blocks_and_photo_blocks_are_fitted(tmp_path):
    np.save(tmp_path / "small.npy", _images(12, (8, 8, 1)))
    with pytest.raises(ValueError, match=r"ingest.samples_per_shard \(10\) must be a multiple of ingest.block_size"):
        pipeline.ingest("arrays", {"files": {"train": str(tmp_path / "small.npy")}}, tmp_path / "small", 10, 4,
                        progress=False)
    np.save(tmp_path / "large.npy", _images(12, (80, 80, 3)))
    index = pipeline.ingest("arrays", {"files": {"train": str(tmp_path / "large.npy")}}, tmp_path / "large", 10,
                            progress=False)  # block_size 1024: lowered to a divisor of 10 for encoded blocks
    assert index.layout == "encoded-blocks" and 10 % index.block_size == 0
    assert [s.num_samples for s in index.splits["train"].shards] == [10, 2]
