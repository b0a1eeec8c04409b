"""The resident loader's batches from an order drawn per epoch, gathered one at a time (a CPU's choice) or several at
a time (CUDA's), against the per-batch gather of 081ef38: the same images, labels and crops, batch for batch,
across chunk sizes, ranks and a resume; and which device gets which gather."""

import pytest
import torch
from conftest import write_numbered_shards

from pipeline import open_loader
from pipeline.loader import resident
from pipeline.loader.base import generator


def per_batch_gather(loader, skip=0):
    """The loader as it was before the change (pipeline/loader/resident.py at 081ef38): one gather per batch."""
    images, labels, _ = loader.load()
    n = len(images)
    perm = torch.randperm(n, generator=generator(loader.seed, loader.epoch)) if loader.shuffle else torch.arange(n)
    if loader.pad:
        positions = torch.arange(loader.start, loader.stop) % n
    else:
        positions = torch.arange(loader.rank * n // loader.world_size, (loader.rank + 1) * n // loader.world_size)
    mine = perm[positions]
    if loader.shuffle:
        mine = mine[torch.randperm(len(mine), generator=generator(loader.seed, loader.epoch, loader.rank, 1))]
    out = []
    for b in range(skip, loader.batch_count(len(mine))):
        idx = mine[b * loader.batch_size : (b + 1) * loader.batch_size]
        out.append((loader._augment(images.index_select(0, idx), loader._crop_params(b, len(idx))),
                    None if labels is None else labels.index_select(0, idx)))
    return out


def _same(expected, batches):
    assert len(expected) == len(batches) > 0
    for (images, labels), batch in zip(expected, batches, strict=True):
        assert torch.equal(images, batch.images) and torch.equal(labels, batch.labels)


GATHERS = pytest.mark.parametrize("gather", ["batch", "block"])


@GATHERS
@pytest.mark.parametrize("batches_per_gather", [1, 2, 3, 1000])
@pytest.mark.parametrize(("rank", "world", "shuffle", "drop_last"),
                         [(0, 1, True, True), (1, 2, True, False), (0, 3, False, False), (2, 3, True, True)])
def test_batches_are_those_of_the_per_batch_gather(tmp_path, monkeypatch, gather, batches_per_gather, rank, world,
                                                   shuffle, drop_last):
    shard_dir = write_numbered_shards(tmp_path, [13, 20, 9])
    loader = open_loader(shard_dir, "train", batch_size=4, rank=rank, world_size=world, seed=5, shuffle=shuffle,
                         drop_last=drop_last, resident="on")
    loader.gather = gather
    monkeypatch.setattr(resident, "GATHER_BYTES", batches_per_gather * 4 * 16)  # 16 bytes per 4x4 image
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        _same(per_batch_gather(loader), list(loader))


@GATHERS
@pytest.mark.parametrize("stop_after", [1, 2, 3])
def test_resume_inside_a_gathered_block_is_exact(tmp_path, monkeypatch, gather, stop_after):
    monkeypatch.setattr(resident, "GATHER_BYTES", 3 * 4 * 16)  # three batches per gather: resume lands inside one
    shard_dir = write_numbered_shards(tmp_path, [13, 20, 9])
    make = lambda: open_loader(shard_dir, "train", batch_size=4, seed=3, resident="on")  # noqa: E731
    first = make()
    first.gather = gather
    first.set_epoch(1)
    for i, _ in enumerate(first):
        if i + 1 == stop_after:
            break
    resumed = make()
    resumed.gather = gather
    resumed.load_state_dict(first.state_dict())
    resumed.set_epoch(1)
    _same(per_batch_gather(resumed, skip=stop_after), list(resumed))


@GATHERS
def test_crops_and_flips_follow_the_batch_number(digits_shards, monkeypatch, gather):
    monkeypatch.setattr(resident, "GATHER_BYTES", 2 * 32 * 64)  # 8x8 digits, two batches of 32 per gather
    loader = open_loader(digits_shards, "train", batch_size=32, seed=1, resident="on", crop_size=(6, 6), flip=True)
    loader.gather = gather
    loader.set_epoch(2)
    batches = list(loader)
    assert batches[0].images.shape == (32, 1, 6, 6)
    _same(per_batch_gather(loader), batches)


def test_the_epoch_order_is_drawn_once_on_the_loaders_device(tmp_path):
    shard_dir = write_numbered_shards(tmp_path, [10, 10])
    loader = open_loader(shard_dir, "train", batch_size=4, seed=2, resident="on")
    order = loader.epoch_order()
    assert order.device == loader.device and sorted(order.tolist()) == list(range(20))
    loader.set_epoch(1)
    assert not torch.equal(order, loader.epoch_order())  # reshuffled per epoch


def test_each_device_gets_its_gather_and_both_give_the_same_batches(tmp_path, monkeypatch):
    """A CPU gathers per batch (measured faster there), CUDA in blocks (fewer launches, by design); a CUDA loader
    is only built here, never iterated, so no GPU is needed."""
    monkeypatch.setattr(resident, "GATHER_BYTES", 2 * 4 * 16)  # two batches per block: blocks and views both run
    shard_dir = write_numbered_shards(tmp_path, [13, 20, 9])
    make = lambda device: open_loader(shard_dir, "train", batch_size=4, seed=7, drop_last=False, resident="on",  # noqa: E731
                                      device=device)
    assert resident.gather_for(torch.device("cpu")) == "batch" and resident.gather_for(torch.device("cuda")) == "block"
    assert make("cpu").gather == "batch" and make("cuda").gather == "block"
    assert make(None).gather == "batch"  # no device given: the CPU
    by_gather = {}
    for gather in resident.GATHERS:
        loader = make("cpu")
        loader.gather = gather
        by_gather[gather] = list(loader)
    assert len(by_gather["batch"]) == len(by_gather["block"]) == 11  # 42 samples, the last batch of 2
    for one, other in zip(by_gather["batch"], by_gather["block"], strict=True):
        assert torch.equal(one.images, other.images) and torch.equal(one.labels, other.labels)
        assert one.images.stride() == other.images.stride()  # the same memory layout too
    _same(per_batch_gather(make("cpu")), by_gather["batch"])
