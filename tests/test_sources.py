"""Source plugins: every registered source round-trips through ingest, plus each one's own formats and errors."""

from __future__ import annotations

import pickle
import sys
import textwrap

import numpy as np
import pytest
import webdataset as wds
from conftest import shared_dataset
from PIL import Image
from support.data import rng_images, write_cifar10_bin, write_idx
from support.img2dataset import photos, write_img2dataset

import pipeline
from pipeline import SourceError
from pipeline.sources import available_sources


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(path)


def build_digits(tmp_path):
    return {}


def build_idx(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng_images(12, (6, 5)))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(12, dtype=np.uint8) % 3)
    return {"root": str(tmp_path)}


def build_torchvision(tmp_path):
    return {"dataset": "FakeData", "kwargs": {"image_size": (3, 6, 6), "num_classes": 3},
            "splits": {"train": {"size": 12}, "test": {"size": 5}}}


def build_cifar(tmp_path):
    write_cifar10_bin(tmp_path / "data_batch_1.bin", rng_images(7, (32, 32, 3)), np.arange(7) % 10)
    write_cifar10_bin(tmp_path / "data_batch_2.bin", rng_images(6, (32, 32, 3), 1), np.arange(6) % 10)
    write_cifar10_bin(tmp_path / "test_batch.bin", rng_images(4, (32, 32, 3), 2), np.arange(4))
    return {"root": str(tmp_path)}


def build_imagefolder(tmp_path):
    for i, image in enumerate(rng_images(9, (5, 7, 3))):
        _png(tmp_path / ("cat" if i % 2 else "dog") / f"{i:02d}.png", image)
    return {"root": str(tmp_path)}


def build_arrays(tmp_path):
    np.savez(tmp_path / "train.npz", images=rng_images(11, (3, 5, 6)), labels=np.arange(11) % 4)
    np.save(tmp_path / "test.npy", rng_images(5, (5, 6, 3)))
    return {"files": {"train": str(tmp_path / "train.npz"), "test": str(tmp_path / "test.npy")}}


def build_hf(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the hf source's extra is not installed (pip install '.[hf]')")
    rows = {"image": [Image.fromarray(a) for a in rng_images(10, (6, 6, 3))], "label": list(range(10))}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    data = datasets.Dataset.from_dict(rows, features=features).train_test_split(test_size=3, seed=0)
    data.save_to_disk(str(tmp_path / "saved"))
    return {"path": str(tmp_path / "saved")}


def build_shapes(tmp_path):
    return {"train_samples": 20, "test_samples": 6, "size": 32}


def build_webdataset(tmp_path):
    write_img2dataset(tmp_path, photos(9, size=32))
    return {"urls": str(tmp_path)}


BUILDERS = {name[len("build_"):]: f for name, f in globals().items() if name.startswith("build_")}


def test_every_registered_source_has_a_round_trip_builder():
    assert set(BUILDERS) <= set(available_sources())
    assert set(available_sources()) - {"throwaway"} == set(BUILDERS)  # a new built-in needs a builder here


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_source_round_trips_through_ingest(name, tmp_path):
    options = BUILDERS[name](_make_dir(tmp_path / "input"))
    source = pipeline.build_source(name, options)
    index = pipeline.ingest(name, options, tmp_path / "shards", samples_per_shard=8, block_size=4, progress=False)
    assert index.source["name"] == name
    for split in source.splits():
        records = list(source.records(split))
        assert source.num_records(split) in (None, len(records))
        if len(records) > 5:  # a range read is the same slice of the split
            assert [r.key for r in source.records(split, 2, 5)] == [r.key for r in records[2:5]]
        images, labels, factors = pipeline.read_split(tmp_path / "shards", split, with_factors=True)
        np.testing.assert_array_equal(images, np.stack([r.image for r in records]))
        assert index.image_shape == records[0].image.shape
        if records[0].label is None:
            assert labels is None
        else:
            assert labels.tolist() == [r.label for r in records]
        if records[0].factors is not None:
            np.testing.assert_allclose(factors, np.stack([r.factors for r in records]))
        assert index.splits[split].num_samples == len(records)


def _make_dir(parent):
    parent.mkdir(parents=True, exist_ok=True)
    return parent


# ---- cifar


def test_cifar_binary_layout_is_decoded_to_hwc(tmp_path):
    images = rng_images(3, (32, 32, 3))
    write_cifar10_bin(tmp_path / "data_batch_1.bin", images, np.array([4, 5, 6]))
    records = list(pipeline.build_source("cifar", {"root": str(tmp_path)}).records("train"))
    np.testing.assert_array_equal(np.stack([r.image for r in records]), images)
    assert [r.label for r in records] == [4, 5, 6]


def test_cifar100_binary_and_python_batches(tmp_path):
    images = rng_images(4, (32, 32, 3))
    planes = images.transpose(0, 3, 1, 2).reshape(4, -1)
    coarse, fine = np.array([1, 2, 3, 4]), np.array([10, 20, 30, 40])
    binary = _make_dir(tmp_path / "bin")
    (binary / "train.bin").write_bytes(np.concatenate([coarse[:, None], fine[:, None], planes], 1).astype(np.uint8)
                                       .tobytes())
    python = _make_dir(tmp_path / "py")
    with open(python / "train", "wb") as f:
        pickle.dump({b"data": planes, b"fine_labels": fine.tolist(), b"coarse_labels": coarse.tolist()}, f)
    for root in (binary, python):
        for which, expected in (("fine", fine), ("coarse", coarse)):
            source = pipeline.build_source("cifar", {"root": str(root), "variant": "cifar100", "labels": which})
            records = list(source.records("train"))
            assert [r.label for r in records] == expected.tolist(), (root, which)
            np.testing.assert_array_equal(np.stack([r.image for r in records]), images)


def test_cifar10_python_batches_and_a_hostile_pickle(tmp_path):
    images = rng_images(3, (32, 32, 3))
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": images.transpose(0, 3, 1, 2).reshape(3, -1), b"labels": [1, 2, 3]}, f)
    records = list(pipeline.build_source("cifar", {"root": str(tmp_path)}).records("train"))
    np.testing.assert_array_equal(np.stack([r.image for r in records]), images)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": __import__("collections").OrderedDict()}, f)  # any class beyond numpy is refused
    with pytest.raises(SourceError, match="not a CIFAR python batch.*refusing to load collections.OrderedDict"):
        list(pipeline.build_source("cifar", {"root": str(tmp_path)}).records("test"))


def test_cifar_truncated_and_missing_files(tmp_path):
    (tmp_path / "data_batch_1.bin").write_bytes(b"\0" * 3073 * 2 + b"\0" * 100)
    with pytest.raises(SourceError, match="truncated or not a cifar10 binary batch.*re-download"):
        pipeline.build_source("cifar", {"root": str(tmp_path)}).num_records("train")
    with pytest.raises(SourceError, match="no CIFAR batch files"):
        pipeline.build_source("cifar", {"root": str(_make_dir(tmp_path / "empty"))}).splits()
    with pytest.raises(SourceError, match="does not exist; set source.options.root"):
        pipeline.build_source("cifar", {"root": str(tmp_path / "nowhere")}).splits()


@pytest.mark.slow
def test_real_cifar10_subset(tmp_path, caplog):
    root = shared_dataset("cifar10-subset")
    with caplog.at_level("WARNING"):
        index = pipeline.ingest("cifar", {"root": str(root)}, tmp_path, progress=False)
    assert "test_batch_first1000.bin, which is not an official cifar10 file name: it holds 1000 records" in caplog.text
    assert index.image_shape == (32, 32, 3) and index.layout == "packed"
    assert index.splits["train"].num_samples == 10000 and index.splits["test"].num_samples == 1000
    assert index.splits["train"].num_classes == 10
    images, labels = pipeline.read_split(tmp_path, "test")
    raw = np.fromfile(root / "test_batch_first1000.bin", np.uint8).reshape(1000, 3073)
    np.testing.assert_array_equal(labels, raw[:, 0])
    np.testing.assert_array_equal(images, raw[:, 1:].reshape(1000, 3, 32, 32).transpose(0, 2, 3, 1))


# ---- imagefolder


def test_imagefolder_labels_splits_and_formats(tmp_path):
    rgb = rng_images(4, (6, 6, 3))
    _png(tmp_path / "train" / "b_class" / "x.png", rgb[0])
    Image.fromarray(rgb[1]).save(_make_dir(tmp_path / "train" / "a_class") / "y.webp", lossless=True)
    Image.fromarray(rgb[2]).save(_make_dir(tmp_path / "test" / "a_class") / "z.jpg", quality=100)
    source = pipeline.build_source("imagefolder", {"root": str(tmp_path)})
    assert source.splits() == ["train", "test"]
    train = list(source.records("train"))
    assert [(r.key, r.label) for r in train] == [("a_class/y.webp", 0), ("b_class/x.png", 1)]
    np.testing.assert_array_equal(train[0].image, rgb[1])  # lossless WebP
    assert [r.label for r in source.records("test")] == [0]


def test_imagefolder_without_subfolders_has_no_labels_and_can_hold_out_a_test_split(tmp_path):
    for i, image in enumerate(rng_images(10, (4, 4, 1))):
        _png(tmp_path / f"{i}.png", image)
    source = pipeline.build_source("imagefolder", {"root": str(tmp_path), "test_fraction": 0.3})
    train, test = list(source.records("train")), list(source.records("test"))
    assert (len(train), len(test)) == (7, 3) and {r.key for r in train}.isdisjoint(r.key for r in test)
    assert all(r.label is None for r in train)


def test_imagefolder_mixed_loose_and_foldered_files_is_an_error(tmp_path):
    _png(tmp_path / "cls" / "a.png", rng_images(1, (4, 4, 1))[0])
    _png(tmp_path / "loose.png", rng_images(1, (4, 4, 1))[0])
    with pytest.raises(SourceError, match="1 image.*directly under the root.*labels=none"):
        list(pipeline.build_source("imagefolder", {"root": str(tmp_path)}).records("train"))
    assert len(list(pipeline.build_source("imagefolder", {"root": str(tmp_path), "labels": "none"})
                    .records("train"))) == 2


def test_imagefolder_empty_and_missing_roots(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(SourceError, match="no image files under .*, nor files Pillow identifies as images"):
        pipeline.ingest("imagefolder", {"root": str(tmp_path)}, tmp_path / "out", progress=False)
    with pytest.raises(SourceError, match="is not a directory.*set source.options.root"):
        pipeline.ingest("imagefolder", {"root": str(tmp_path / "nope")}, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "index.json").exists()


# ---- arrays


@pytest.mark.parametrize(("shape", "layout"), [((5, 6, 7), "NHW"), ((5, 6, 7, 3), "NHWC"), ((5, 3, 6, 7), "NCHW")])
def test_arrays_layouts(tmp_path, shape, layout):
    data = rng_images(shape[0], shape[1:])
    np.save(tmp_path / "x.npy", data)
    np.save(tmp_path / "y.npy", np.arange(5))
    source = pipeline.build_source("arrays", {"files": {"train": str(tmp_path / "x.npy")},
                                              "labels": {"train": str(tmp_path / "y.npy")}})
    records = list(source.records("train"))
    expected = {"NHW": lambda: data[..., None], "NHWC": lambda: data,
                "NCHW": lambda: data.transpose(0, 2, 3, 1)}[layout]()
    np.testing.assert_array_equal(np.stack([r.image for r in records]), expected)
    assert [r.label for r in records] == list(range(5))


def test_arrays_refuses_ambiguous_float_and_mismatched_inputs(tmp_path):
    np.save(tmp_path / "amb.npy", rng_images(2, (3, 5, 4)))
    with pytest.raises(SourceError, match="both axis 1 and axis 3 could be channels; set source.options.layout"):
        pipeline.build_source("arrays", {"files": {"train": str(tmp_path / "amb.npy")}}).num_records("train")
    np.save(tmp_path / "f.npy", np.zeros((2, 4, 4), np.float32))
    with pytest.raises(SourceError, match="float32 images; store uint8.*np.rint"):
        pipeline.build_source("arrays", {"files": {"train": str(tmp_path / "f.npy")}}).num_records("train")
    np.savez(tmp_path / "m.npz", images=rng_images(3, (4, 4)), labels=np.arange(2))
    with pytest.raises(SourceError, match="3 images in .* but 2 labels"):
        pipeline.build_source("arrays", {"files": {"train": str(tmp_path / "m.npz")}}).num_records("train")
    with pytest.raises(SourceError, match="does not exist or is not a file"):
        pipeline.build_source("arrays", {"files": {"train": str(tmp_path / "none.npy")}}).num_records("train")


# ---- hf


def test_hf_parquet_files(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the hf source's extra is not installed (pip install '.[hf]')")
    images = rng_images(6, (5, 5, 1))
    rows = {"img": [Image.fromarray(a[..., 0]) for a in images], "digit": [3, 1, 4, 1, 5, 9]}
    features = datasets.Features({"img": datasets.Image(), "digit": datasets.Value("int64")})
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "train.parquet"))
    options = {"parquet": {"train": [str(tmp_path / "train.parquet")]}, "image_column": "img",
               "label_column": "digit", "cache_dir": str(tmp_path / "cache")}
    records = list(pipeline.build_source("hf", options).records("train"))
    np.testing.assert_array_equal(np.stack([r.image for r in records]), images)
    assert [r.label for r in records] == [3, 1, 4, 1, 5, 9]
    with pytest.raises(SourceError, match="no column 'image'.*set source.options.image_column"):
        pipeline.build_source("hf", {**options, "image_column": "image"}).num_records("train")
    with pytest.raises(SourceError, match="exactly one of source.options.path"):
        pipeline.build_source("hf", {})


# ---- shapes


def test_shapes_are_deterministic_binary_sprites_with_factors(tmp_path):
    options = {"train_samples": 30, "test_samples": 0, "size": 64}
    source = pipeline.build_source("shapes", options)
    a = list(source.records("train"))
    b = list(pipeline.build_source("shapes", options).records("train"))
    other = list(pipeline.build_source("shapes", {**options, "seed": 1}).records("train"))
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.image, y.image) and np.array_equal(x.factors, y.factors)
    assert not all(np.array_equal(x.factors, y.factors) for x, y in zip(a, other, strict=True))
    images = np.stack([r.image for r in a])
    assert images.shape == (30, 64, 64, 1) and set(np.unique(images)) == {0, 255}
    assert (images.reshape(30, -1) > 0).sum(1).min() > 20  # every sprite is visible
    factors = np.stack([r.factors for r in a])
    assert factors.shape == (30, 5) and set(factors[:, 0]) <= {0, 1, 2}
    assert source.factor_names == ("shape", "scale", "orientation", "x", "y")
    # the same factors at another position move the sprite and nothing else
    from pipeline.sources.shapes import render

    left, right = render(0, 1.0, 0.0, 0.0, 0.5, 64), render(0, 1.0, 0.0, 1.0, 0.5, 64)
    assert (left > 0).sum() == (right > 0).sum()
    assert np.argwhere(left[..., 0])[:, 1].mean() < 20 < 44 < np.argwhere(right[..., 0])[:, 1].mean()


def test_shapes_factors_are_stored_per_sample_in_the_shards(tmp_path):
    index = pipeline.ingest("shapes", {"train_samples": 10, "test_samples": 0}, tmp_path, 8, 4, progress=False)
    assert index.factor_names == ["shape", "scale", "orientation", "x", "y"]
    assert index.splits["train"].num_factors == 5
    block = next(iter(wds.WebDataset(str(tmp_path / "train-000000.tar"), shardshuffle=False).decode()))
    assert block["factors.npy"].shape == (4, 5) and block["images.npy"].shape == (4, 64, 64, 1)
    batch = next(iter(pipeline.open_loader(tmp_path, "train", batch_size=5, shuffle=False)))
    expected = pipeline.build_source("shapes", {"train_samples": 10, "test_samples": 0}).factors("train")[:5]
    np.testing.assert_allclose(batch.factors.numpy(), expected)
    assert batch.labels.tolist() == expected[:, 0].astype(int).tolist()


# ---- third-party plugins


def test_a_throwaway_plugin_package_is_found_and_ingested(tmp_path, monkeypatch):
    """A package outside this repository declares a source in its entry points: no change here is needed."""
    site = tmp_path / "site"
    (site / "toyplug").mkdir(parents=True)
    (site / "toyplug" / "__init__.py").write_text(textwrap.dedent('''
        import numpy as np
        from pipeline.records import Record
        from pipeline.sources import Source, SourceConfig

        class Config(SourceConfig):
            n: int = 9

        class Throwaway(Source):
            name = "throwaway"
            Config = Config

            def splits(self):
                return ["train"]

            def records(self, split, start=0, stop=None):  # no num_records: ingested by one task
                for i in range(self.config.n):
                    yield Record(f"t{i}", np.full((3, 3, 1), i, np.uint8), label=i % 2)
    '''))
    dist = site / "toyplug-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toyplug\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[vaepipe.sources]\nthrowaway = toyplug:Throwaway\n")
    monkeypatch.syspath_prepend(str(site))
    available_sources.cache_clear()
    try:
        assert "throwaway" in available_sources()
        index = pipeline.ingest("throwaway", {"n": 9}, tmp_path / "out", 4, 2, progress=False)
        images, labels = pipeline.read_split(tmp_path / "out", "train")
        assert images[:, 0, 0, 0].tolist() == list(range(9)) and labels.tolist() == [i % 2 for i in range(9)]
        assert index.source == {"name": "throwaway", "config": {"n": 9}}
        with pytest.raises(SourceError, match="unknown source 'nope'; valid sources: .*throwaway"):
            pipeline.build_source("nope")
    finally:
        monkeypatch.undo()
        sys.modules.pop("toyplug", None)
        available_sources.cache_clear()
    assert "throwaway" not in available_sources()
