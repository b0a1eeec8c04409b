"""Sources, the shard format and the per-rank loader."""

import json
import subprocess
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import shared_dataset, write_numbered_shards
from support.data import write_idx

import pipeline
from pipeline import ShardFormatError, ShardLoader, SourceError, open_loader
from pipeline.loader import ResidentLoader, StreamedLoader
from pipeline.sources.idx import read_idx


def test_digits_round_trip(tmp_path):
    index = pipeline.ingest("digits", {}, tmp_path, samples_per_shard=512, block_size=128, progress=False)
    assert index.image_shape == (8, 8, 1)
    assert sum(s.num_samples for s in index.splits.values()) == 1797
    assert len(index.splits["train"].shards) == 3  # 1438 train images at 512 per shard
    images, labels = pipeline.read_split(tmp_path, "test")
    source_images = [r.image for r in pipeline.build_source("digits").records("test")]
    np.testing.assert_array_equal(images, np.stack(source_images))
    assert set(labels.tolist()) == set(range(10))
    assert index.splits["test"].num_classes == 10


def test_shards_are_plain_webdataset_and_tar(digits_shards):
    shard = digits_shards / "train-000000.tar"
    sample = next(iter(wds.WebDataset(str(shard), shardshuffle=False).decode()))
    assert sample["images.npy"].shape == (128, 8, 8, 1) and sample["images.npy"].dtype == np.uint8
    assert set(sample) >= {"images.npy", "labels.npy", "keys.json"}
    keys = sample["keys.json"]
    assert len(json.loads(keys) if isinstance(keys, bytes) else keys) == 128
    listing = subprocess.run(["tar", "tf", str(shard)], capture_output=True, text=True, check=True).stdout.split()
    assert "train-block-000000.images.npy" in listing


def test_index_records_checksums(digits_shards):
    import hashlib

    index = pipeline.read_index(digits_shards)
    for info in index.splits["train"].shards:
        data = (digits_shards / info.name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == info.sha256 and len(data) == info.bytes


def test_missing_index_is_refused(digits_shards, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "train-000000.tar").write_bytes((digits_shards / "train-000000.tar").read_bytes())
    with pytest.raises(ShardFormatError, match="no index.json, so an ingest was interrupted.*Re-run the ingest"):
        open_loader(partial, "train", batch_size=8)
    assert not pipeline.is_complete(partial)


def test_empty_and_missing_directories_are_refused(tmp_path):
    with pytest.raises(ShardFormatError, match="has no index.json and no shards"):
        pipeline.read_index(tmp_path)
    with pytest.raises(ShardFormatError, match="does not exist; run the ingest first"):
        pipeline.read_index(tmp_path / "nowhere")


def test_unknown_source_lists_valid_names():
    with pytest.raises(SourceError, match="unknown source 'nope'; valid sources: .*digits.*idx.*torchvision"):
        pipeline.build_source("nope")


def test_killed_ingest_leaves_no_index_and_rerun_keeps_finished_groups(tmp_path, monkeypatch):
    from pipeline import shards

    real = shards.SplitWriter
    calls = []

    def dies_on_third_group(*args, **kwargs):
        calls.append(args[1:3])  # (split, first shard)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the ingest is killed while writing its third shard group
        return real(*args, **kwargs)

    monkeypatch.setattr(shards, "SplitWriter", dies_on_third_group)
    with pytest.raises(KeyboardInterrupt):
        pipeline.ingest("digits", {}, tmp_path, 512, 128, progress=False)
    assert not (tmp_path / "index.json").exists()
    with pytest.raises(ShardFormatError, match="interrupted"):
        pipeline.read_index(tmp_path)
    finished = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("train-00000[01].tar")}
    assert len(finished) == 2
    calls.clear()
    monkeypatch.setattr(shards, "SplitWriter", lambda *a, **k: (calls.append(a[1:3]), real(*a, **k))[1])
    index = pipeline.ingest("digits", {}, tmp_path, 512, 128, progress=False)
    assert index.splits["train"].num_samples + index.splits["test"].num_samples == 1797
    assert calls == [("train", 2), ("test", 0)]  # the two finished groups were kept, not rewritten
    assert {n: (tmp_path / n).stat().st_mtime_ns for n in finished} == finished
    fresh = tmp_path / "fresh"
    pipeline.ingest("digits", {}, fresh, 512, 128, progress=False)
    for a, b in zip(pipeline.read_split(fresh, "train"), pipeline.read_split(tmp_path, "train"), strict=True):
        np.testing.assert_array_equal(a, b)  # the resumed directory holds what a clean ingest holds


def test_reingest_with_other_source_config_is_refused(digits_shards):
    with pytest.raises(ShardFormatError, match="choose another ingest.shard_dir or set ingest.overwrite=true"):
        pipeline.ingest("digits", {"seed": 7}, digits_shards, 512, 128, progress=False)


@pytest.mark.parametrize("resident", ["off", "on"])
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_read_disjoint_data_with_equal_batches_on_uneven_shards(tmp_path, world, resident):
    counts = [7, 30, 3, 11, 1]  # 52 samples, deliberately uneven
    shard_dir = write_numbered_shards(tmp_path, counts)
    total = sum(counts)
    for epoch in (0, 1):
        per_rank, lengths = [], []
        for rank in range(world):
            loader = open_loader(shard_dir, "train", batch_size=4, rank=rank, world_size=world, seed=5,
                                 drop_last=False, shuffle_buffer=8, resident=resident)
            loader.set_epoch(epoch)
            batches = list(loader)
            lengths.append((len(loader), len(batches)))
            per_rank.append([int(i) for b in batches for i in b.labels])
            for b in batches:  # the image really is the sample its label names
                assert (b.images[:, 0, 0, 0] == b.labels % 256).all()
        assert len({n for pair in lengths for n in pair}) == 1, lengths  # same count on every rank, as promised
        together = [i for labels in per_rank for i in labels]
        assert set(together) == set(range(total))
        padding = len(together) - total  # ceil(N / world) * world - N repeats, like DistributedSampler
        assert padding == -total % world
        if padding == 0:
            assert len(set(per_rank[0]) & set(per_rank[1])) == 0


@pytest.mark.parametrize("resident", ["off", "on"])
def test_shuffle_is_seeded_and_changes_per_epoch(tmp_path, resident):
    shard_dir = write_numbered_shards(tmp_path, [16, 16, 16])

    def order(seed, epoch):
        loader = open_loader(shard_dir, "train", batch_size=4, seed=seed, shuffle_buffer=8, resident=resident)
        loader.set_epoch(epoch)
        return [int(i) for b in loader for i in b.labels]

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1)
    assert sorted(order(1, 1)) == list(range(48))


def test_too_small_split_for_one_batch_per_rank(tmp_path):
    shard_dir = write_numbered_shards(tmp_path, [5])
    with pytest.raises(ShardFormatError, match="fewer than one batch of 4 for each of 2 rank"):
        open_loader(shard_dir, "train", batch_size=4, world_size=2, rank=0)


def test_truncated_shard_is_reported(tmp_path):
    shard_dir = write_numbered_shards(tmp_path, [16, 16], block_size=4)
    shard = shard_dir / "train-000001.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()][:6]  # first 2 of its 4 blocks
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            import io

            tar.addfile(member, io.BytesIO(data))
    loader = open_loader(shard_dir, "train", batch_size=4, shuffle=False)
    with pytest.raises(ShardFormatError, match="train-000001.tar holds 8 samples but index.json says"):
        list(loader)


def test_idx_source_reads_gzipped_files(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 6, 5), dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(20, dtype=np.uint8) % 10)
    source = pipeline.build_source("idx", {"root": str(tmp_path)})
    assert source.splits() == ["train"]
    records = list(source.records("train"))
    np.testing.assert_array_equal(np.stack([r.image[..., 0] for r in records]), images)
    assert [r.label for r in records][:3] == [0, 1, 2]


def test_idx_source_reports_truncated_and_missing_files(tmp_path):
    header = bytes([0, 0, 8, 3]) + np.array([10, 28, 28], ">i4").tobytes()  # promises 10 images of 28x28
    (tmp_path / "train-images-idx3-ubyte").write_bytes(header + b"x" * 100)
    with pytest.raises(SourceError, match="truncated or corrupt"):
        list(pipeline.build_source("idx", {"root": str(tmp_path)}).records("train"))
    with pytest.raises(SourceError, match="does not exist; set source.options.root"):
        pipeline.build_source("idx", {"root": str(tmp_path / "missing")}).splits()
    (tmp_path / "train-images-idx3-ubyte").unlink()
    with pytest.raises(SourceError, match="no 'train-images-idx3-ubyte"):
        pipeline.build_source("idx", {"root": str(tmp_path)}).splits()


def test_torchvision_source_by_class_name(tmp_path):
    options = {"dataset": "FakeData", "kwargs": {"image_size": (3, 12, 10), "num_classes": 4},
               "splits": {"train": {"size": 40}, "test": {"size": 10, "random_offset": 99}}}
    index = pipeline.ingest("torchvision", options, tmp_path, 64, 16, progress=False)
    assert index.image_shape == (12, 10, 3)
    assert index.splits["train"].num_samples == 40 and index.splits["test"].num_samples == 10
    with pytest.raises(SourceError, match="torchvision has no dataset 'NoSuchSet'; valid: .*MNIST"):
        pipeline.build_source("torchvision", {"dataset": "NoSuchSet"}).records("train").__next__()


def test_torchvision_missing_files_say_how_to_fix(tmp_path):
    source = pipeline.build_source("torchvision", {"dataset": "MNIST", "root": str(tmp_path)})
    with pytest.raises(SourceError, match="download=true when online"):
        next(source.records("train"))


@pytest.mark.slow
def test_real_mnist_ingest(tmp_path):
    mnist = shared_dataset("mnist")
    index = pipeline.ingest("idx", {"root": str(mnist)}, tmp_path, progress=False)
    assert index.image_shape == (28, 28, 1)
    assert index.splits["train"].num_samples == 60000 and index.splits["test"].num_samples == 10000
    assert index.splits["train"].num_classes == 10
    raw = read_idx(mnist / "t10k-images-idx3-ubyte.gz")
    images, labels = pipeline.read_split(tmp_path, "test")
    np.testing.assert_array_equal(images[..., 0], raw)
    assert np.bincount(labels).min() > 800


@pytest.mark.parametrize("resident", ["off", "on"])
def test_position_resumes_mid_epoch_without_repeats_or_gaps(tmp_path, resident):
    shard_dir = write_numbered_shards(tmp_path, [13, 20, 9])
    make = lambda: open_loader(shard_dir, "train", batch_size=4, rank=1, world_size=2, seed=3,  # noqa: E731
                               shuffle_buffer=8, resident=resident)
    full = make()
    full.set_epoch(2)
    expected = [b.labels.tolist() for b in full]
    interrupted = make()
    interrupted.set_epoch(2)
    seen = []
    for batch in interrupted:
        seen.append(batch.labels.tolist())
        if len(seen) == 2:
            break
    state = interrupted.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the trainer sets the epoch again on resume: the position must survive it
    rest = [b.labels.tolist() for b in resumed]
    assert seen + rest == expected
    resumed.set_epoch(3)  # the next epoch starts from its beginning
    assert resumed.position == 0
    assert len(list(resumed)) == len(resumed)


def test_resident_mode_is_chosen_by_the_memory_budget(tmp_path):
    shard_dir = write_numbered_shards(tmp_path, [16, 16])  # 32 images of 4x4x1: 512 bytes
    fits = open_loader(shard_dir, "train", batch_size=4, resident="auto", memory_budget=512)
    too_big = open_loader(shard_dir, "train", batch_size=4, resident="auto", memory_budget=511)
    assert isinstance(fits, ResidentLoader) and fits.resident
    assert isinstance(too_big, StreamedLoader) and not too_big.resident
    assert isinstance(open_loader(shard_dir, "train", batch_size=4, resident="on", memory_budget=0), ResidentLoader)
    assert isinstance(open_loader(shard_dir, "train", batch_size=4), StreamedLoader)  # 'off' is the default
    with pytest.raises(ValueError, match="resident must be 'auto', 'on' or 'off', got 'always'"):
        open_loader(shard_dir, "train", batch_size=4, resident="always")
    with pytest.raises(TypeError, match="abstract"):  # the common type only; open_loader builds one
        ShardLoader(shard_dir, "train", batch_size=4)
    loader = open_loader(shard_dir, "train", batch_size=4, resident="on", shuffle=False)
    batch = next(iter(loader))
    assert batch.images.dtype == torch.uint8 and batch.images.shape == (4, 1, 4, 4)
    assert batch.labels.tolist() == [0, 1, 2, 3] and (batch.images[:, 0, 0, 0] == batch.labels).all()
    assert loader._data[0].shape == (32, 1, 4, 4)  # decoded once, kept as one uint8 tensor


def test_streamed_batches_gather_rgb_as_channels_first(tmp_path):
    shard_dir = write_numbered_shards(tmp_path, [10, 6], shape=(3, 5, 3))
    for resident in ("off", "on"):
        batches = list(open_loader(shard_dir, "train", batch_size=4, resident=resident))
        assert len(batches) == 4 and all(b.images.shape == (4, 3, 3, 5) for b in batches)
        assert all(b.images.permute(0, 2, 3, 1).is_contiguous() for b in batches)  # channels-last memory (Batch)
        for b in batches:
            assert (b.images == (b.labels % 256).to(torch.uint8)[:, None, None, None]).all()


def test_to_input_binarizes_afresh_and_dequantizes():
    from vae.config import RunConfig
    from vae.objectives.inputs import to_input

    images = torch.full((64, 1, 8, 8), 128, dtype=torch.uint8)
    plain = to_input(images, RunConfig())
    assert torch.allclose(plain, torch.full_like(plain, 128 / 255))
    cfg = RunConfig.model_validate({"data": {"binarize": True}})
    first, second = to_input(images, cfg), to_input(images, cfg)
    assert set(first.unique().tolist()) == {0.0, 1.0} and not torch.equal(first, second)  # a fresh draw each time
    assert abs(first.mean().item() - 128 / 255) < 0.03  # Bernoulli(intensity)
    cfg = RunConfig.model_validate({"data": {"dequantize": True}})
    x = to_input(images, cfg)
    assert (x >= 128 / 256).all() and (x <= 129 / 256).all() and x.std() > 0  # (128 + u) / 256
    from vae.config import ConfigError, validate

    with pytest.raises(ConfigError, match="data.binarize and data.dequantize exclude each other"):
        validate({"data": {"binarize": True, "dequantize": True}})


def test_to_input_makes_the_models_layout_from_channels_last_batches():
    """Loaders hand batches out channels-last in memory; the model gets planar float input (or channels-last
    when train.channels_last asks), with every pixel where it was."""
    from vae.config import RunConfig
    from vae.objectives.inputs import to_input

    planar = torch.randint(0, 256, (4, 3, 5, 7), dtype=torch.uint8)
    batch = planar.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # what a loader hands out
    assert not batch.is_contiguous()
    x = to_input(batch, RunConfig())
    assert x.is_contiguous() and torch.equal(x, planar.float() / 255)
    x = to_input(batch, RunConfig(), torch.channels_last)
    assert x.is_contiguous(memory_format=torch.channels_last) and torch.equal(x, planar.float() / 255)
    # without a format named, the run's own: validation and evaluation feed the layout training converted the model to
    x = to_input(batch, RunConfig(train={"channels_last": True}))
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    assert torch.equal(x, planar.float() / 255)


def test_build_loaders_follows_the_data_section(digits_shards):
    from vae.config import RunConfig
    from vae.training.data import build_loaders

    cfg = RunConfig.model_validate({"ingest": {"shard_dir": str(digits_shards)}, "train": {"batch_size": 32}})
    train, val = build_loaders(cfg, rank=1, world_size=2)
    assert train.resident and val.resident and train.device == torch.device("cpu")  # 1797 8x8 images fit
    cfg.data.resident = "off"
    train, val = build_loaders(cfg, rank=1, world_size=2)
    assert not train.resident and len(train) == 1438 // 2 // 32
    assert sum(len(b.images) for b in val) == 359 - 359 // 2
