"""Latent shards read back through `pipeline.open_loader` (issue 25): a real encode of photos by a tiny random aekl
diffusers folder, then the loader's guarantees on it: the values plain webdataset reads (bf16 bit for bit), every
sample exactly once across ranks, a seeded shuffle, resume, resident = streamed, a corrupt shard named, and the
source's captions carried through."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import test_encode
import torch
import webdataset as wds
from support.img2dataset import photos, write_img2dataset

import pipeline
from pipeline.latents import read_index, restored
from pipeline.loader import CorruptShardError, LatentBatch, LatentLoader
from pipeline.storage import Location
from vae.latents import EncodeOptions, encode_dataset, load_encoder

folder, tree = test_encode.folder, test_encode.tree  # the fixtures: a tiny random aekl diffusers folder, 32 photos


@pytest.fixture(scope="module")
def shards(tree):
    out = tree.parent / "shards"
    pipeline.ingest("imagefolder", {"root": str(tree)}, out, samples_per_shard=9, block_size=3,
                    layout="encoded-blocks", progress=False)
    return out


@pytest.fixture(scope="module", params=["float16", "bfloat16", "float32"])
def latents(request, folder, shards, tmp_path_factory):
    """24 train and 8 test photos encoded with the mirrored twin, 5 to a shard (uneven: 5 shards of 4-5)."""
    out = tmp_path_factory.mktemp("latents") / request.param
    encode_dataset(load_encoder(str(folder)), shards, out,
                   EncodeOptions(samples_per_shard=5, batch_size=8, flip=True, dtype=request.param))
    return out


def plain(out, split: str) -> list[dict]:
    urls = [str(out / s.name) for s in read_index(out).splits[split].shards]
    return list(wds.WebDataset(urls, shardshuffle=False).decode())


def every_batch(loader) -> list[LatentBatch]:
    return list(loader)


def joined(batches: list[LatentBatch], field: str) -> torch.Tensor:
    return torch.cat([getattr(b, field) for b in batches])


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of 16-bit values: equal bits, equal values (and NaNs compare)."""
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


@pytest.mark.parametrize("resident", ["off", "on"])
def test_latents_read_through_open_loader_equal_what_plain_webdataset_reads_in_the_stored_dtype(latents, resident):
    index = read_index(latents)
    loader = pipeline.open_loader(latents, "train", 5, resident=resident, shuffle=False, drop_last=False, pad=False)
    assert isinstance(loader, LatentLoader) and loader.resident == (resident == "on")
    assert loader.output_shape == index.latent_shape and len(loader) == 5
    batches = every_batch(loader)
    samples = plain(latents, "train")
    assert [k for b in batches for k in b.keys] == [s["key.txt"] for s in samples]
    assert torch.cat([b.labels for b in batches]).tolist() == [s["cls"] for s in samples]
    expected_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[index.dtype]
    for field in ("mean", "std", "mean_flip", "std_flip"):
        got = joined(batches, field)
        want = restored(np.stack([s[f"{field}.npy"] for s in samples]), index.dtype)
        assert got.dtype == expected_dtype and got.shape == (24, *index.latent_shape)
        assert torch.equal(bits(got), bits(want)), field  # bit for bit, bf16 included
    assert batches[0].captions is None  # an imagefolder has no captions


def test_two_ranks_read_every_latent_exactly_once_and_padded_ranks_have_equal_batch_counts(latents):
    keys = [s["key.txt"] for s in plain(latents, "train")]
    exact = [[k for b in pipeline.open_loader(latents, "train", 4, rank=r, world_size=2, seed=3, drop_last=False,
                                              pad=False) for k in b.keys] for r in range(2)]
    assert sorted(exact[0] + exact[1]) == sorted(keys) and not set(exact[0]) & set(exact[1])
    padded = [pipeline.open_loader(latents, "train", 5, rank=r, world_size=5, seed=3) for r in range(5)]
    assert {len(p) for p in padded} == {1}  # 24 over 5 ranks: ceil(24 / 5) = 5 each, one batch of 5
    seen = [k for p in padded for b in p for k in b.keys]
    assert set(seen) == set(keys) and len(seen) == 25  # one sample repeated to pad the last rank


def test_the_shuffle_is_a_function_of_the_seed_resident_equals_streamed_and_a_position_resumes(latents):
    def order(seed: int, resident: str = "off", epoch: int = 0) -> list[str]:
        loader = pipeline.open_loader(latents, "train", 4, seed=seed, resident=resident, shuffle_buffer=8)
        loader.set_epoch(epoch)
        return [k for b in loader for k in b.keys]

    first = order(7)
    assert first == order(7) and first == order(7, resident="on")
    assert first != order(8) and first != order(7, epoch=1) and sorted(first) == sorted(order(8))
    loader = pipeline.open_loader(latents, "train", 4, seed=7)
    loader.set_epoch(1)
    it = iter(loader)
    taken = [next(it), next(it)]
    state = loader.state_dict()
    rest = list(it)
    resumed = pipeline.open_loader(latents, "train", 4, seed=7, resident="on")
    resumed.load_state_dict(state)
    resumed.set_epoch(1)
    again = list(resumed)
    assert state == {"epoch": 1, "position": 2} and len(taken) + len(rest) == len(loader)
    assert [b.keys for b in again] == [b.keys for b in rest]
    assert all(torch.equal(bits(a.mean), bits(b.mean)) for a, b in zip(again, rest, strict=True))


def test_a_corrupt_latent_shard_is_named_in_the_error_and_skip_reads_on_with_the_batch_count_kept(latents, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(latents, broken)
    name = read_index(broken).splits["train"].shards[1].name
    data = (broken / name).read_bytes()
    (broken / name).write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CorruptShardError, match=rf"{broken / name} .*the shard is corrupt. Re-run `vaepipe encode`"):
        list(pipeline.open_loader(broken, "train", 4, shuffle=False))
    skipping = pipeline.open_loader(broken, "train", 4, shuffle=False, on_corrupt="skip")
    batches = list(skipping)
    assert list(skipping.skipped_shards) == [name] and len(batches) == len(skipping) == 6
    intact = {k for b in pipeline.open_loader(latents, "train", 4, shuffle=False) for k in b.keys}
    lost = {s["key.txt"] for s in plain(latents, "train")[4:9]}  # the second shard's: images 4..8 of 24 in 5 groups
    assert {k for b in batches for k in b.keys} == intact - lost


def test_a_split_whose_every_latent_shard_is_corrupt_names_the_encode_as_the_repair(latents, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(latents, broken)
    for shard in read_index(broken).splits["train"].shards:
        (broken / shard.name).write_bytes(b"not a tar")
    for resident in ("on", "off"):  # the resident load and the streamed plan each find nothing left to read
        loader = pipeline.open_loader(broken, "train", 4, shuffle=False, on_corrupt="skip", resident=resident)
        with pytest.raises(pipeline.ShardFormatError, match=r"no readable shard .*Re-run `vaepipe encode` into"):
            list(loader)


def test_load_time_crops_and_flips_are_refused_naming_the_fix(latents, shards):
    with pytest.raises(ValueError, match="encode with --flip"):
        pipeline.open_loader(latents, "train", 4, flip=True)
    with pytest.raises(ValueError, match="encode again with --crop-size"):
        pipeline.open_loader(latents, "train", 4, crop_size=(8, 8))
    with pytest.raises(FileNotFoundError, match="not a complete latent directory"):
        read_index(shards.parent / "nowhere")
    with pytest.raises(pipeline.ShardFormatError, match="'vaepipe-shards' .* is not 'vaepipe-latents'"):
        read_index(shards)


def test_a_captioned_source_gives_every_latent_its_caption_in_the_shards_the_index_and_the_loader(folder, tmp_path):
    source = tmp_path / "i2d"
    written = write_img2dataset(source, photos(10, size=32), per_shard=4,
                                captions={0: "", 1: "un café\nà deux lignes"})
    shards = tmp_path / "shards"
    pipeline.ingest("webdataset", {"urls": str(source)}, shards, progress=False)
    out = tmp_path / "latents"
    index = encode_dataset(load_encoder(str(folder)), shards, out, EncodeOptions(samples_per_shard=4))
    assert index.splits["train"].captions and index.splits["train"].num_classes is None
    expected = [(w.key, w.caption) for w in written]
    assert [(s["key.txt"], s["txt"]) for s in plain(out, "train")] == expected
    loader = pipeline.open_loader(out, "train", 3, shuffle=False, drop_last=False, pad=False)
    batches = list(loader)
    assert [(k, c) for b in batches for k, c in zip(b.keys, b.captions, strict=True)] == expected
    assert batches[0].labels is None and batches[0].mean_flip is None


def test_an_encode_between_fsspec_urls_writes_the_shards_a_local_encode_writes_and_reads_back(folder, tree, shards,
                                                                                            tmp_path):
    """SHARD_DIR and OUT_DIR as memory:// URLs (any fsspec file system, as for shard directories): the latent shards
    are byte for byte those of the same encode between local paths, and the loader reads them there."""
    source, out = "memory://encode-test/shards", "memory://encode-test/latents"
    pipeline.ingest("imagefolder", {"root": str(tree)}, source, samples_per_shard=9, block_size=3,
                    layout="encoded-blocks", progress=False)
    options = EncodeOptions(samples_per_shard=10, flip=True)
    encoder = load_encoder(str(folder))
    remote = encode_dataset(encoder, source, out, options)
    local = encode_dataset(encoder, shards, tmp_path / "latents", options)
    assert remote.source["index_sha256"] == pipeline.index_sha256(source)
    for split in ("train", "test"):
        assert remote.splits[split].shards == local.splits[split].shards  # names, counts, bytes and sha256
        there, here = (list(pipeline.open_loader(d, split, 4, shuffle=False, drop_last=False, pad=False))
                       for d in (out, tmp_path / "latents"))
        assert [b.keys for b in there] == [b.keys for b in here]
        assert all(torch.equal(a.mean_flip, b.mean_flip) for a, b in zip(there, here, strict=True))
    with pytest.raises(FileExistsError, match="already holds a complete latent directory"):
        encode_dataset(encoder, source, out, options)
    Location("memory://encode-test/foreign").write_text("notes.txt", "mine")
    with pytest.raises(FileExistsError, match="memory:///?encode-test/foreign holds files no encode of vaepipe wrote"):
        encode_dataset(encoder, source, "memory://encode-test/foreign", options)


def test_vaepipe_encode_from_and_to_an_s3_bucket_records_its_run_and_the_loader_reads_it_there(
        folder, tree, s3_server, monkeypatch, tmp_path):
    """The command between two prefixes of a moto S3 bucket (the endpoint from AWS_ENDPOINT_URL, as s3fs reads it):
    index.json written last there, the MLflow run names both s3:// directories, the loader reads the latents."""
    import mlflow
    import s3fs
    from conftest import BIN, run

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    s3fs.S3FileSystem.clear_instance_cache()  # an instance made for another endpoint would be reused
    pipeline.ingest("imagefolder", {"root": str(tree)}, "s3://shards/photos", samples_per_shard=9, block_size=3,
                    layout="encoded-blocks", progress=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run([str(BIN / "vaepipe"), "encode", str(folder), "s3://shards/photos", "s3://shards/latents",
                  "--samples-per-shard", "16", "--split", "test"], env={**os.environ, "MLFLOW_TRACKING_URI": uri},
                 timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    index = read_index("s3://shards/latents")
    assert index.splits["test"].num_samples == 8 and not Location("s3://shards/latents").exists(".encode")
    keys = [k for b in pipeline.open_loader("s3://shards/latents", "test", 3, shuffle=False, drop_last=False,
                                            pad=False) for k in b.keys]
    assert keys == [k for k, _ in pipeline.read_captions("s3://shards/photos", "test")]
    (run_,) = mlflow.MlflowClient(uri).search_runs([mlflow.MlflowClient(uri).get_experiment_by_name(
        "encode-latents").experiment_id])
    sources = {d.dataset.name: json.loads(d.dataset.source) for d in run_.inputs.dataset_inputs}
    assert "s3://shards/photos" in json.dumps(sources["source-shards"])
    assert "s3://shards/latents" in json.dumps(sources["latent-shards"])
