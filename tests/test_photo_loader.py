"""The large-image path (issue 14): JPEG trees ingested with their bytes kept, read and decoded by worker
processes with every guarantee of the small-image path, seeded crops and flips, and the layout registry.

The photos are real: crops of the two photographs scikit-learn ships (`load_sample_images`), saved as JPEG.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

import pipeline
from pipeline import ShardFormatError, open_loader
from pipeline.augment import crop_flip
from pipeline.layouts import get_layout
from pipeline.loader import CorruptShardError
from pipeline.loader.read import BatchPool
from pipeline.npy import npy_header

SIDE = 80  # 80x80x3 = 19,200 bytes: above the packed limit, so 'auto' stores them encoded


def photo_tree(root: Path, n: int, side: int = SIDE, seed: int = 0, quality: int = 90) -> Path:
    """`n` JPEG crops of scikit-learn's sample photographs under root/{train,test}/{china,flower} (3:1)."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two 427x640 RGB photographs
    rng = np.random.default_rng(seed)
    for i in range(n):
        photo = photos[i % len(photos)]
        top, left = rng.integers(0, photo.shape[0] - side), rng.integers(0, photo.shape[1] - side)
        split = "test" if i % 4 == 3 else "train"
        path = root / split / ("china" if i % 2 == 0 else "flower") / f"{i:04d}.jpg"  # two classes
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo[top : top + side, left : left + side]).save(path, quality=quality)
    return root


# each layout that stores encoded photos, with shard and block sizes that leave uneven shards (48 train photos)
PHOTO_LAYOUTS = {"encoded": (7, 1), "encoded-blocks": (9, 3)}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A tree of 64 photos: 48 in train, 16 in test."""
    return photo_tree(tmp_path_factory.mktemp("photos") / "tree", 64)


@pytest.fixture(scope="module", params=sorted(PHOTO_LAYOUTS))
def photos(request, tree) -> tuple[Path, Path]:
    """The tree and its shards in each photo layout (uneven shards: 7 or 9 photos each, in blocks of 3)."""
    samples_per_shard, block_size = PHOTO_LAYOUTS[request.param]
    out = tree.parent / f"shards-{request.param}"
    index = pipeline.ingest("imagefolder", {"root": str(tree)}, out, samples_per_shard=samples_per_shard,
                            block_size=block_size, layout=request.param, progress=False)
    assert index.layout == request.param and index.block_size == block_size
    return tree, out


def stored_files(out: Path, split: str) -> list[bytes]:
    """Every encoded file the split's shards store, cut out by the layout's own table."""
    index = pipeline.read_index(out)
    files = []
    for shard in index.splits[split].shards:
        with open(out / shard.name, "rb") as f:
            table = get_layout(index.layout).table(f, shard.name, index.image_shape)
            for offset, size in zip(table.offsets.tolist(), table.sizes.tolist(), strict=True):
                f.seek(offset)
                files.append(f.read(size))
    return files


def _all(loader) -> list:
    return [(b.images.clone(), None if b.labels is None else b.labels.clone()) for b in loader]


def test_untouched_jpegs_are_stored_byte_for_byte(photos):
    root, out = photos
    source = sorted(p.read_bytes() for p in (root / "train").rglob("*.jpg"))
    assert sorted(stored_files(out, "train")) == source  # no decode-encode, no quality loss
    # the byte ratio (shards / source, goal <= 1.05 at 256 px) is bench/photo_loader.py's: on 2 kB thumbnails
    # tar's 512-byte framing per member dominates


def test_photo_ingests_store_blocks_of_encoded_files_by_default(tree, tmp_path):
    """'auto' picks encoded-blocks for photos: a WebDataset sample per block, whose encoded.bin cut at its
    offsets.npy gives the source files, in the order of keys.json, with their labels."""
    out = tmp_path / "shards"
    index = pipeline.ingest("imagefolder", {"root": str(tree)}, out, samples_per_shard=16, progress=False)
    assert index.layout == "encoded-blocks" and 16 % index.block_size == 0
    urls = [str(out / s.name) for s in index.splits["train"].shards]
    blocks = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert len(blocks) == 48 // index.block_size
    classes = sorted(p.name for p in (tree / "train").iterdir())
    for block in blocks:
        ends = np.load(io.BytesIO(block["offsets.npy"]))
        keys, formats = json.loads(block["keys.json"]), json.loads(block["formats.json"])
        labels = np.load(io.BytesIO(block["labels.npy"]))
        assert len(keys) == len(formats) == len(labels) == len(ends) - 1 == index.block_size
        for i, key in enumerate(keys):
            assert block["encoded.bin"][ends[i] : ends[i + 1]] == (tree / "train" / key).read_bytes()
            assert formats[i] == "jpg" and classes[labels[i]] == key.split("/")[0]
    streamed, labels = pipeline.read_split(out, "train")
    resident = open_loader(out, "train", batch_size=48, resident="on", shuffle=False, drop_last=False, pad=False)
    assert torch.equal(resident.load()[0].permute(0, 2, 3, 1), torch.as_tensor(streamed))


def test_resized_images_are_encoded_in_the_configured_format(tmp_path):
    root = photo_tree(tmp_path / "tree", 8)
    out = tmp_path / "shards"
    index = pipeline.ingest("imagefolder", {"root": str(root)}, out, samples_per_shard=8, block_size=1, progress=False,
                            image_size=(64, 64), size_rule="crop", image_format="png", layout="encoded")
    with tarfile.open(out / index.splits["train"].shards[0].name) as tar:
        suffixes = {m.name.split(".", 1)[1] for m in tar}
    assert "png" in suffixes and "jpg" not in suffixes
    images, _ = pipeline.read_split(out, "train")
    assert images.shape == (6, 64, 64, 3)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_get_equal_batch_counts_on_uneven_shards_with_workers(photos, world):
    _, out = photos
    seen = []
    counts = set()
    for rank in range(world):
        loader = open_loader(out, "train", batch_size=3, rank=rank, world_size=world, seed=4, workers=2)
        batches = list(loader)
        counts.add(len(batches))
        assert len(batches) == len(loader)
        seen.append(torch.cat([b.images for b in batches]))
    assert len(counts) == 1  # DDP would hang otherwise


def test_workers_do_not_change_a_single_batch(photos):
    _, out = photos
    make = lambda workers: open_loader(out, "train", batch_size=4, seed=2, workers=workers, crop_size=(48, 48),  # noqa: E731
                                       flip=True)
    reference = _all(make(0))
    for workers in (1, 2):
        batches = _all(make(workers))
        assert len(batches) == len(reference)
        for (a, la), (b, lb) in zip(reference, batches, strict=True):
            assert torch.equal(a, b) and torch.equal(la, lb)


def test_in_process_batches_the_consumer_keeps_are_never_refilled(photos):
    """In process, batches are filled into reused buffers; a batch (or a view of one) still held must not be
    one of them, however many the consumer keeps."""
    _, out = photos
    make = lambda workers: open_loader(out, "train", batch_size=4, seed=5, workers=workers, crop_size=(48, 48),  # noqa: E731
                                       flip=True)
    loader = make(0)
    kept = [b.images for b in loader]  # no copies: every batch stays alive
    views = [b.images[1:] for b in loader]  # second epoch-0 pass: only views stay alive
    expected = _all(make(2))
    assert len(kept) == len(views) == len(expected)
    for a, v, (b, _) in zip(kept, views, expected, strict=True):
        assert torch.equal(a, b) and torch.equal(v, b[1:])


def test_batch_pool_reuses_a_buffer_only_once_nothing_holds_it():
    pool = BatchPool(2, nbytes=2 * 3 * 4 * 4)
    first = pool.take((2, 3, 4, 4))
    address = first.data_ptr()
    assert address == pool.buffers[0].data_ptr()  # a pool buffer, not a fresh allocation at the same place
    first.fill_(7)
    view = first[1]
    del first
    second = pool.take((2, 3, 4, 4))  # the view keeps the first buffer in use
    second.fill_(9)
    assert second.data_ptr() == pool.buffers[1].data_ptr() and torch.all(view == 7)
    del view
    third = pool.take((1, 3, 4, 4))  # a shorter batch reuses a free buffer's first bytes
    assert third.data_ptr() == address
    assert pool.take((2, 3, 4, 4)).data_ptr() not in (address, second.data_ptr())  # both held: a fresh one
    assert pool.misses == 1
    del second, third
    slot = pool.reserve(96)  # reserved for a worker: not handed out again until wrapped or released
    other = pool.reserve(96)
    assert {slot, other} == {0, 1} and pool.reserve(96) is None
    pool.release(other)
    assert pool.wrap(slot, (96,)).data_ptr() == pool.buffers[slot].data_ptr() and pool.reserve(96) == other
    assert pool.reserve(97) is None  # larger than a buffer


def test_workers_decode_into_the_consumers_reused_shared_buffers(photos):
    """With workers, each batch is decoded into a shared buffer the consuming process reserved for it and wraps
    on arrival (no fresh shared memory per batch, no page faults after the first epoch); batches the consumer
    keeps are never refilled, and an epoch broken off gives its buffers back once its workers are gone."""
    _, out = photos
    make = lambda workers: open_loader(out, "train", batch_size=4, seed=3, workers=workers, crop_size=(48, 48),  # noqa: E731
                                       flip=True)
    expected = {epoch: None for epoch in (0, 1)}
    for epoch in expected:
        reference = make(0)
        reference.set_epoch(epoch)
        expected[epoch] = _all(reference)
    loader = make(2)
    first = next(iter(loader))  # an epoch broken off after one batch, with the workers still prefetching
    del first
    pool = loader._pool
    buffers = {b.data_ptr() for b in pool.buffers}
    assert pool.buffers[0].is_shared() and not pool._reserved  # the broken-off epoch's reservations came back
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        got = []
        for batch in loader:  # dropped as the next arrives: buffers are reused, none allocated afresh
            assert batch.images.data_ptr() in buffers
            got.append((batch.images.clone(), batch.labels.clone()))
        assert len(got) == len(expected[epoch])
        for (a, la), (b, lb) in zip(expected[epoch], got, strict=True):
            assert torch.equal(a, b) and torch.equal(la, lb)
    assert pool.misses == 0
    kept = [b.images for b in loader]  # every batch kept: the pool runs out and fresh buffers take over
    assert pool.misses > 0 and len({t.data_ptr() for t in kept}) == len(kept)
    for a, (b, _) in zip(kept, expected[1], strict=True):
        assert torch.equal(a, b)


DECODER_IMPORT_SCRIPT = """
import importlib.abc, os, sys

class Spy(importlib.abc.MetaPathFinder):  # notes each process that imports the codecs (workers inherit it)
    def find_spec(self, name, path, target=None):
        if name == "torchvision.io":
            with open(sys.argv[2], "a") as f:
                f.write(f"{os.getpid()}\\n")

sys.meta_path.insert(0, Spy())
import pipeline
loader = pipeline.open_loader(sys.argv[1], "train", batch_size=4, workers=2)
for epoch in range(2):
    loader.set_epoch(epoch)
    assert sum(len(b.images) for b in loader) == 48
print(os.getpid())
"""


def test_workers_inherit_the_codecs_instead_of_importing_them_each_epoch(photos, tmp_path):
    """Workers are forked anew each epoch; importing torchvision's codecs in each cost ~2.3 s before its first
    batch (3-4 s to the first batch of every epoch). The loading process imports them before it forks."""
    import subprocess
    import sys

    _, out = photos
    log = tmp_path / "imports.txt"
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", DECODER_IMPORT_SCRIPT, str(out), str(log)], cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert log.read_text().split() == [done.stdout.split()[-1]]  # once, by the parent; never by a worker


def test_batches_hold_the_decoded_pixels_channels_last(photos):
    """Every CPU path hands out (B, C, H, W) whose memory is (B, H, W, C), the decoders' own order (no planar
    copy in the loader), holding exactly what torchvision decodes from the stored files, channel by channel."""
    from torchvision.io import ImageReadMode, decode_jpeg

    _, out = photos
    files = stored_files(out, "train")
    truth = torch.stack([decode_jpeg(torch.frombuffer(bytearray(f), dtype=torch.uint8), mode=ImageReadMode.RGB)
                         for f in files])
    for options in ({"workers": 0}, {"workers": 2}, {"resident": "on"}, {"resident": "on", "workers": 2}):
        loader = open_loader(out, "train", batch_size=5, shuffle=False, drop_last=False, pad=False, **options)
        batches = [b.images for b in loader]
        assert all(b.permute(0, 2, 3, 1).is_contiguous() for b in batches), options
        assert torch.equal(torch.cat(batches), truth), options


def test_gpu_style_batched_decode_equals_worker_decode(photos):
    """decode_device 'device' decodes whole batches with torchvision's batched decode_jpeg on the loader's
    device (nvJPEG on a GPU); on this CPU it runs the same code path and must give the same batches."""
    _, out = photos
    workers = _all(open_loader(out, "train", batch_size=4, seed=1, workers=2, crop_size=(40, 40), flip=True))
    batched = _all(open_loader(out, "train", batch_size=4, seed=1, decode_device="device", crop_size=(40, 40),
                               flip=True))
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(workers, batched, strict=True))


def test_mid_epoch_resume_with_workers_is_exact(photos):
    _, out = photos
    make = lambda: open_loader(out, "train", batch_size=3, seed=7, workers=2, crop_size=(64, 64), flip=True)  # noqa: E731
    full = make()
    full.set_epoch(1)
    expected = _all(full)
    first = make()
    first.set_epoch(1)
    taken = []
    for batch in first:
        taken.append(batch.images.clone())
        if len(taken) == 5:
            break
    state = first.state_dict()
    second = make()
    second.load_state_dict(json.loads(json.dumps(state)))  # as a checkpoint stores it
    second.set_epoch(1)
    rest = [b.images for b in second]
    assert len(taken) + len(rest) == len(expected)
    assert all(torch.equal(a, b) for a, (b, _) in zip(taken + rest, expected, strict=True))


def _corrupt_one_image(out: Path, shard: str) -> None:
    """Overwrite the middle of the first JPEG in `shard` (the tar headers and the block's offsets stay intact)."""
    path = out / shard
    index = pipeline.read_index(out)
    with open(path, "rb") as f:
        table = get_layout(index.layout).table(f, shard, index.image_shape)
    offset, size = int(table.offsets[0]), int(table.sizes[0])
    data = bytearray(path.read_bytes())
    data[offset + 20 : offset + size - 20] = b"\x00" * (size - 40)
    path.write_bytes(bytes(data))


def test_an_undecodable_image_follows_the_corrupt_shard_policy(photos, tmp_path):
    import shutil

    _, source = photos
    out = tmp_path / "shards"
    shutil.copytree(source, out)
    bad = pipeline.read_index(out).splits["train"].shards[2].name
    _corrupt_one_image(out, bad)
    with pytest.raises(CorruptShardError, match=rf"{bad} could not be read at sample 0.*data.on_corrupt_shard skip"):
        list(open_loader(out, "train", batch_size=4, workers=2, shuffle=False))
    skipping = open_loader(out, "train", batch_size=4, workers=2, on_corrupt="skip")
    assert len(list(skipping)) == len(skipping) and list(skipping.skipped_shards) == [bad]


def test_a_truncated_shard_is_skipped_with_workers_and_counts_stay_equal(photos, tmp_path):
    import shutil

    _, source = photos
    out = tmp_path / "shards"
    shutil.copytree(source, out)
    bad = pipeline.read_index(out).splits["train"].shards[1].name
    (out / bad).write_bytes((out / bad).read_bytes()[:3000])
    with pytest.raises(CorruptShardError, match=bad):
        list(open_loader(out, "train", batch_size=4, workers=2))
    ranks = [open_loader(out, "train", batch_size=4, rank=r, world_size=2, workers=2, on_corrupt="skip")
             for r in range(2)]
    assert [len(list(r)) for r in ranks] == [len(ranks[0])] * 2


def test_a_block_whose_offsets_do_not_cut_its_bytes_is_a_corrupt_shard(tree, tmp_path):
    out = tmp_path / "shards"
    index = pipeline.ingest("imagefolder", {"root": str(tree)}, out, samples_per_shard=9, block_size=3,
                            progress=False)
    bad = index.splits["train"].shards[1].name
    with tarfile.open(out / bad) as tar:
        member = next(m for m in tar if m.name.endswith(".offsets.npy"))
    data = bytearray((out / bad).read_bytes())
    _, _, header = npy_header(bytes(data[member.offset_data : member.offset_data + member.size]))
    second = member.offset_data + header + 8  # where the block's second image begins: now past its end
    data[second : second + 8] = np.int64(1 << 40).tobytes()
    (out / bad).write_bytes(bytes(data))
    for resident in ("off", "on"):
        with pytest.raises(CorruptShardError, match=rf"{bad} holds a block .*\(corrupt offsets\.npy\)"):
            list(open_loader(out, "train", batch_size=4, workers=2, resident=resident))
    ranks = [open_loader(out, "train", batch_size=4, rank=r, world_size=2, workers=2, on_corrupt="skip")
             for r in range(2)]
    assert [len(list(r)) for r in ranks] == [len(ranks[0])] * 2
    assert all(list(r.skipped_shards) == [bad] for r in ranks if r.skipped_shards)


def test_resident_photos_are_decoded_once_and_cropped_on_the_device(photos):
    _, out = photos
    loader = open_loader(out, "train", batch_size=4, resident="on", workers=2, crop_size=(32, 48), flip=True)
    batch = next(iter(loader))
    assert batch.images.shape == (4, 3, 32, 48) and loader.resident
    assert loader.load()[0].shape == (48, 3, SIDE, SIDE)


def test_crops_and_flips_are_seeded_by_epoch_and_validation_is_centred(photos):
    _, out = photos
    make = lambda: open_loader(out, "train", batch_size=4, seed=3, crop_size=(32, 32), flip=True, shuffle=False)  # noqa: E731
    a, b = make(), make()
    assert torch.equal(next(iter(a)).images, next(iter(b)).images)
    b.set_epoch(1)
    assert not torch.equal(next(iter(make())).images, next(iter(b)).images)  # new crops each epoch
    val = open_loader(out, "test", batch_size=4, crop_size=(32, 32), crop="centre", shuffle=False, drop_last=False,
                      pad=False)
    full = open_loader(out, "test", batch_size=4, shuffle=False, drop_last=False, pad=False)
    top = (SIDE - 32) // 2
    assert torch.equal(next(iter(val)).images, next(iter(full)).images[:, :, top : top + 32, top : top + 32])


def test_crop_flip_is_a_crop_and_a_mirror():
    images = torch.arange(2 * 3 * 5 * 6, dtype=torch.uint8).reshape(2, 3, 5, 6)
    out = crop_flip(images, np.array([[1, 2, 0], [0, 1, 1]]), (3, 4))
    assert torch.equal(out[0], images[0, :, 1:4, 2:6])
    assert torch.equal(out[1], images[1, :, 0:3, 1:5].flip(-1))


def test_an_unknown_layout_is_refused_listing_the_known_ones(photos, tmp_path):
    import shutil

    _, source = photos
    out = tmp_path / "shards"
    shutil.copytree(source, out)
    index = json.loads((out / "index.json").read_text())
    index["layout"] = "zipped"
    (out / "index.json").write_text(json.dumps(index))
    known = r"unknown shard layout 'zipped'; this vaepipe reads \['encoded', 'encoded-blocks', 'packed'\]"
    with pytest.raises(ShardFormatError, match=known):
        open_loader(out, "train", batch_size=4)


def test_the_layout_choices_are_the_registry_and_auto_everywhere_they_are_offered():
    """ingest.layout is spelled out as a Literal (pydantic validates and documents it) in the one ingest schema,
    pipeline.settings, which imports no torch; it must offer exactly the registered layouts and 'auto'."""
    from typing import get_args

    from pipeline.layouts import LAYOUTS, LayoutChoice
    from pipeline.settings import IngestSection

    assert set(get_args(LayoutChoice)) == {"auto", *LAYOUTS}
    assert set(get_args(IngestSection.model_fields["layout"].annotation)) == set(get_args(LayoutChoice))


@pytest.mark.slow
def test_a_256px_jpeg_tree_trains_registers_and_reconstructs_end_to_end(tmp_path):
    """Ingest real 256-px JPEG photos (kept byte for byte), train one epoch with decoding worker processes and
    random crops, register the model in MLflow, and reconstruct validation images through the pyfunc."""
    import uuid

    import mlflow
    from conftest import REPO, run

    from vae.launch.command import accelerate_command

    root = photo_tree(tmp_path / "tree", 16, side=256)
    out = tmp_path / "shards"
    index = pipeline.ingest("imagefolder", {"root": str(root)}, out, samples_per_shard=8, block_size=1,
                            progress=False)
    assert index.layout == "encoded-blocks" and index.image_shape == (256, 256, 3)
    name = f"vae-photos-{uuid.uuid4().hex[:8]}"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    preset = tmp_path / "photos.yaml"
    preset.write_text(
        "source: {name: imagefolder}\n"
        "data: {workers: 2, crop_size: [128, 128], flip: true, resident: 'off'}\n"
        "model: {arch: conv, latent_dim: 8}\nloss: {likelihood: gaussian, eval_iwae_k: 2}\n"
        f"train: {{epochs: 1, batch_size: 4}}\ntracking: {{model_name: {name}}}\n"
    )
    argv, env = accelerate_command(preset, 1, overrides=["--ingest.shard_dir", str(out), "--train.output_dir",
                                                         str(tmp_path / "run")])
    result = run(argv, env={**env, "MLFLOW_TRACKING_URI": uri}, cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert f"registered models:/{name}/1" in result.stdout
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/{name}/1")
    images, _ = pipeline.read_split(out, "test", crop_size=(128, 128))
    x = (images.transpose(0, 3, 1, 2) / 255.0).astype(np.float32)
    recon = model.predict(x)
    assert recon.shape == x.shape and np.isfinite(recon).all()


def test_shards_are_sized_by_bytes_as_well_as_by_count(tmp_path):
    root = photo_tree(tmp_path / "tree", 24)
    largest = max(p.stat().st_size for p in root.rglob("*.jpg"))
    limit = 4 * (largest + 2048) + 2 * 10240  # four of the largest photos with their tar framing, and tar's end
    index = pipeline.ingest("imagefolder", {"root": str(root)}, tmp_path / "shards", progress=False,
                            shard_bytes=limit)
    shards = index.splits["train"].shards
    assert len(shards) >= 18 // 4 and all(s.bytes <= limit for s in shards)
    assert sum(s.num_samples for s in shards) == 18
