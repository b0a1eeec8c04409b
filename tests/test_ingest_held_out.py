"""ingest.test_fraction: a collection that arrives as one split gets a seeded validation split `test`, chosen by a
hash of each input's key, so that a re-ingest in another order or grouping puts every key in the same split; sources
with their own splits are left alone unless ingest.test_from names one."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from support.img2dataset import jpeg, photos, write_img2dataset

import pipeline
from pipeline import SourceError
from pipeline.shards import HeldOut

N = 240


@pytest.fixture
def one_file(tmp_path):
    """A dSprites-like .npz (one split): binary 16x16 images, labels and factors, keys train-0000000 ..."""
    rng = np.random.default_rng(0)
    images = (rng.random((N, 16, 16)) > 0.5).astype(np.uint8) * 255
    labels, factors = np.arange(N) % 3, rng.random((N, 4)).astype(np.float32)
    np.savez(tmp_path / "sprites.npz", images=images, labels=labels, factors=factors)
    return {"files": {"train": str(tmp_path / "sprites.npz")}}, images, labels, factors


def _keys(shard_dir, split) -> list[str]:
    return [key for key, _ in pipeline.read_captions(shard_dir, split)]


def test_an_arrays_file_gets_a_held_out_split_with_its_labels_and_factors(one_file, tmp_path):
    options, images, labels, factors = one_file
    index = pipeline.ingest("arrays", options, tmp_path / "a", samples_per_shard=64, block_size=16,
                            test_fraction=0.2, progress=False)
    assert list(index.splits) == ["train", "test"]
    assert index.held_out == HeldOut(split="test", source_split="train", fraction=0.2, seed=0)
    train, test = _keys(tmp_path / "a", "train"), _keys(tmp_path / "a", "test")
    held = HeldOut(source_split="train", fraction=0.2)
    assert sorted(train + test) == [f"train-{i:07d}" for i in range(N)]
    assert all(held.split_of(k) == "test" for k in test) and all(held.split_of(k) == "train" for k in train)
    assert 0.12 * N < len(test) < 0.28 * N  # binomial(240, 0.2): 48 +- 6.2
    for split, keys in (("train", train), ("test", test)):
        rows = [int(k.split("-")[1]) for k in keys]
        got, got_labels, got_factors = pipeline.read_split(tmp_path / "a", split, with_factors=True)
        np.testing.assert_array_equal(got[..., 0], images[rows])
        assert got_labels.tolist() == labels[rows].tolist()
        np.testing.assert_array_equal(got_factors, factors[rows])
        assert index.splits[split].num_classes == 3 and index.splits[split].num_factors == 4


def test_a_re_ingest_puts_every_key_in_the_same_split_and_another_seed_does_not(one_file, tmp_path):
    options = one_file[0]
    pipeline.ingest("arrays", options, tmp_path / "a", samples_per_shard=64, block_size=16, test_fraction=0.2,
                    progress=False)
    pipeline.ingest("arrays", options, tmp_path / "b", samples_per_shard=32, block_size=8, shards_per_task=3,
                    test_fraction=0.2, progress=False)  # other groups, shards and blocks
    for split in ("train", "test"):
        assert _keys(tmp_path / "a", split) == _keys(tmp_path / "b", split)
    pipeline.ingest("arrays", options, tmp_path / "c", samples_per_shard=64, block_size=16, test_fraction=0.2,
                    test_seed=1, progress=False)
    assert set(_keys(tmp_path / "c", "test")) != set(_keys(tmp_path / "a", "test"))
    bigger = pipeline.ingest("arrays", options, tmp_path / "d", samples_per_shard=64, block_size=16,
                             test_fraction=0.4, progress=False)
    assert set(_keys(tmp_path / "a", "test")) < set(_keys(tmp_path / "d", "test"))  # a larger share only adds
    assert bigger.splits["test"].num_samples > 0.3 * N


def test_webdataset_shards_in_any_order_give_the_same_split_with_captions_and_skips(tmp_path):
    src = tmp_path / "i2d"
    written = write_img2dataset(src, photos(40, size=32), replace={5: jpeg(photos(1, size=32)[0])[:300]})
    tars = sorted(str(p) for p in src.glob("*.tar"))
    held = HeldOut(source_split="train", fraction=0.25, seed=7)
    settings = {"test_fraction": 0.25, "test_seed": 7, "max_skip_fraction": 0.05, "progress": False}
    first = pipeline.ingest("webdataset", {"urls": tars}, tmp_path / "a", samples_per_shard=8, block_size=4,
                            **settings)
    again = pipeline.ingest("webdataset", {"urls": tars[::-1], "use_stats": False}, tmp_path / "b",
                            samples_per_shard=16, block_size=2, **settings)  # shards reversed, a task per tar
    good = [w for i, w in enumerate(written) if i != 5]
    for index, out in ((first, tmp_path / "a"), (again, tmp_path / "b")):
        assert index.splits["test"].captions and index.splits["train"].captions
        for split in ("train", "test"):
            pairs = pipeline.read_captions(out, split)
            assert sorted(pairs) == sorted((w.key, w.caption) for w in good if held.split_of(w.key) == split)
    bad = written[5].key
    (skip,) = [json.loads(line) for line in (tmp_path / "a" / "skipped.jsonl").read_text().splitlines()]
    assert skip["key"] == bad and skip["split"] == held.split_of(bad)
    assert first.splits[held.split_of(bad)].skipped == {"corrupt": 1}


def test_sources_with_their_own_splits_are_left_alone_unless_asked(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.ingest"):
        index = pipeline.ingest("digits", {}, tmp_path / "digits", samples_per_shard=512, block_size=128,
                                test_fraction=0.1, progress=False)
    assert "ingest.test_fraction 0.1 is not applied: source 'digits' has its own splits" in caplog.text
    assert {s: i.num_samples for s, i in index.splits.items()} == {"train": 1438, "test": 359}
    assert index.held_out is None
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("val", 6)):
        np.save(tmp_path / f"{split}.npy", rng.integers(0, 256, (n, 4, 4), dtype=np.uint8))
    files = {"files": {"train": str(tmp_path / "train.npy"), "val": str(tmp_path / "val.npy")}}
    index = pipeline.ingest("arrays", files, tmp_path / "asked", test_fraction=0.3, test_from="train",
                            progress=False)
    assert list(index.splits) == ["train", "val", "test"] and index.splits["val"].num_samples == 6
    assert index.splits["train"].num_samples + index.splits["test"].num_samples == 30
    with pytest.raises(SourceError, match="ingest.test_from 'tain' is not a split of source 'arrays'; it has "
                                          "\\['train', 'val'\\]"):
        pipeline.ingest("arrays", files, tmp_path / "typo", test_fraction=0.3, test_from="tain", progress=False)
    with pytest.raises(SourceError, match="source 'digits' has its own split 'test', so ingest.test_fraction cannot "
                                          "hold out another"):
        pipeline.ingest("digits", {}, tmp_path / "clash", test_fraction=0.1, test_from="train", progress=False)


def test_a_held_out_split_that_gets_no_key_says_why(tmp_path):
    np.save(tmp_path / "few.npy", np.zeros((3, 4, 4), np.uint8))
    assert all(HeldOut(source_split="train", fraction=0.01).split_of(f"train-{i:07d}") == "train" for i in range(3))
    with pytest.raises(SourceError, match="split 'test' yielded no images: ingest.test_fraction 0.01 sent none of the "
                                          "inputs of 'train' to 'test'.*ingest.test_seed"):
        pipeline.ingest("arrays", {"files": {"train": str(tmp_path / "few.npy")}}, tmp_path / "s",
                        test_fraction=0.01, progress=False)


def test_the_one_split_warning_names_the_ingest_option(tmp_path, caplog):
    np.save(tmp_path / "x.npy", np.zeros((4, 4, 4), np.uint8))
    with caplog.at_level(logging.WARNING, logger="pipeline.ingest"):
        pipeline.ingest("arrays", {"files": {"train": str(tmp_path / "x.npy")}}, tmp_path / "s", progress=False)
    assert "gave only the split 'train'" in caplog.text and "--ingest.test_fraction 0.1" in caplog.text
