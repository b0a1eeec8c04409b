"""The loader checks the data against index.json instead of trusting it (issue 12, item 4).

Each case tampers with a copy of a small ingested directory the way a hand-edited index, a foreign writer or a
half-copied shard would, and asserts a `ShardFormatError`/`CorruptShardError` naming the shard and the fix,
with the corrupt-shard policy applied (skip reads on without the shard).
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

import pipeline
from pipeline import ShardFormatError, ShardLoader, open_loader
from pipeline.loader import CorruptShardError


@pytest.fixture
def shards(digits_shards, tmp_path) -> Path:
    """A private copy of the session's digits shards (train: 1,438 images of 8x8x1 in blocks of 128)."""
    out = tmp_path / "digits"
    shutil.copytree(digits_shards, out)
    return out


def _index(out: Path) -> dict:
    return json.loads((out / "index.json").read_text())


def _write_index(out: Path, index: dict) -> None:
    (out / "index.json").write_text(json.dumps(index))


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]


def _rewrite_shard(out: Path, name: str, members: list[tuple[str, bytes]]) -> None:
    """Write `name` from (member name, bytes) pairs and update its size and sha256 in index.json, so only the
    content is wrong (as with a foreign writer), not the checksums."""
    with tarfile.open(out / name, "w") as tar:
        for member, data in members:
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    index = _index(out)
    data = (out / name).read_bytes()
    for split in index["splits"].values():
        for shard in split["shards"]:
            if shard["name"] == name:
                shard["bytes"], shard["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    _write_index(out, index)


def _read_all(out: Path, resident: str, on_corrupt: str = "fail") -> ShardLoader:
    loader = open_loader(out, "train", batch_size=32, resident=resident, on_corrupt=on_corrupt, shuffle=False)
    for _ in loader:
        pass
    return loader


MODES = ["off", "on"]  # streamed and resident read shards through different paths; both must check


@pytest.mark.parametrize("resident", MODES)
def test_image_shape_changed_in_index_is_refused(shards, resident):
    index = _index(shards)
    index["image_shape"] = [4, 16, 1]  # the same 64 bytes per image: today it reads scrambled pixels
    _write_index(shards, index)
    fix = r"train-000000\.tar.*\(128, 8, 8, 1\).*\(4, 16, 1\).*re-run the ingest"
    with pytest.raises(CorruptShardError, match=fix):
        _read_all(shards, resident)


@pytest.mark.parametrize("resident", MODES)
def test_float_block_is_refused_not_read_as_bytes(shards, resident):
    members = [
        (name, _npy(np.load(io.BytesIO(data)).astype(np.float32)) if name.endswith("images.npy") else data)
        for name, data in _members(shards / "train-000001.tar")
    ]
    _rewrite_shard(shards, "train-000001.tar", members)
    with pytest.raises(CorruptShardError, match=r"train-000001\.tar.*float32.*uint8"):
        _read_all(shards, resident)


@pytest.mark.parametrize("resident", MODES)
def test_extra_member_is_a_corrupt_shard_and_skip_reads_on(shards, resident):
    members = [*_members(shards / "train-000002.tar"), ("train-block-999999.notes.txt", b"added by hand")]
    _rewrite_shard(shards, "train-000002.tar", members)
    with pytest.raises(CorruptShardError, match=r"train-000002\.tar.*no images\.npy"):
        _read_all(shards, resident)
    loader = _read_all(shards, resident, on_corrupt="skip")  # the policy applies: no KeyError
    assert list(loader.skipped_shards) == ["train-000002.tar"]


@pytest.mark.parametrize("resident", MODES)
def test_short_labels_are_a_corrupt_shard(shards, resident):
    members = [
        (name, _npy(np.load(io.BytesIO(data))[:10]) if name.endswith("labels.npy") else data)
        for name, data in _members(shards / "train-000000.tar")
    ]
    _rewrite_shard(shards, "train-000000.tar", members)
    with pytest.raises(CorruptShardError, match=r"train-000000\.tar.*10 labels for 128 images"):
        _read_all(shards, resident)


def test_index_that_is_not_an_object_is_refused(shards):
    (shards / "index.json").write_text("[1, 2, 3]")
    with pytest.raises(ShardFormatError, match=r"index\.json holds a JSON list, not an object.*re-run the ingest"):
        pipeline.read_index(shards)


@pytest.mark.parametrize("name", ["../outside.tar", "/etc/passwd", "sub/train-000000.tar", "train-000000"])
def test_shard_names_outside_the_directory_are_refused(shards, name):
    index = _index(shards)
    index["splits"]["train"]["shards"][0]["name"] = name
    _write_index(shards, index)
    with pytest.raises(ShardFormatError, match=r"shard name .* must be a plain file name"):
        open_loader(shards, "train", batch_size=8)


def test_encoded_image_of_another_shape_is_a_corrupt_shard(tmp_path):
    from pipeline.records import Record
    from pipeline.shards import ShardIndex, ShardPlan, SplitInfo, write_index, write_shards
    from pipeline.storage import Location

    records = [Record(f"r{i}", np.full((6, 6, 3), i, np.uint8), label=0) for i in range(8)]
    plan = ShardPlan(layout="encoded", image_format="png", samples_per_shard=8, block_size=1, image_shape=(6, 6, 3))
    written = write_shards(records, Location(tmp_path), "train", 0, plan)
    index = ShardIndex(source={"name": "test", "config": {}}, layout="encoded", image_format="png", block_size=1,
                       image_shape=(3, 12, 3), splits={"train": SplitInfo(num_samples=8, shards=written.shards,
                                                                          num_classes=1)})
    write_index(tmp_path, index)
    with pytest.raises(CorruptShardError, match=r"train-000000\.tar.*\(6, 6, 3\).*\(3, 12, 3\)"):
        open_loader(tmp_path, "train", batch_size=4, shuffle=False).__iter__().__next__()


@pytest.mark.parametrize("resident", MODES)
def test_block_without_the_labels_the_index_promises_is_a_corrupt_shard(shards, resident):
    members = [(name, data) for name, data in _members(shards / "train-000001.tar") if not name.endswith("labels.npy")]
    _rewrite_shard(shards, "train-000001.tar", members)
    with pytest.raises(CorruptShardError, match=r"train-000001\.tar holds a block without labels"):
        _read_all(shards, resident)
