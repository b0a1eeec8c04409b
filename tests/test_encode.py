"""Latents out (issue 25): a shard directory encoded by a tiny aekl diffusers folder into latent shards, read back
by plain webdataset; every image exactly once, with the mean AutoencoderKL's own encode gives; index.json last;
a killed encode resumes keeping its finished groups."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import BIN, run
from test_photo_loader import PHOTO_LAYOUTS, photo_tree

import pipeline
from pipeline.latents import read_index, restored
from vae.latents import EncodeOptions, encode_dataset, load_encoder
from vae.latents import encode as encode_module
from vae.models.spec import build_from_spec, model_spec
from vae.registry.diffusers import export_diffusers

SIDE = 80  # the photos' side: divisible by the tiny model's factor 4
SPEC = model_spec("aekl", (3, SIDE, SIDE), 4, channels=[8, 16, 16], layers_per_block=1, norm_groups=4,
                  attention=False, likelihood="gaussian")
STATS = {"shift_factor": 0.25, "scaling_factor": 1.5, "mean": [0.1, 0.2, 0.3, 0.4], "std": [1.0, 0.9, 0.8, 0.7]}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny random aekl model as a diffusers folder, with latent statistics in its config."""
    torch.manual_seed(0)
    model = build_from_spec(SPEC).eval()
    return export_diffusers(model, tmp_path_factory.mktemp("vae") / "vae", STATS)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return photo_tree(tmp_path_factory.mktemp("photos") / "tree", 32)  # 24 train, 8 test


@pytest.fixture(scope="module", params=sorted(PHOTO_LAYOUTS))
def shards(request, tree) -> Path:
    samples_per_shard, block_size = PHOTO_LAYOUTS[request.param]
    out = tree.parent / f"shards-{request.param}"
    pipeline.ingest("imagefolder", {"root": str(tree)}, out, samples_per_shard=samples_per_shard,
                    block_size=block_size, layout=request.param, progress=False)
    return out


def reference(folder: Path, shard_dir: Path, split: str, flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """AutoencoderKL's own encode of the split's pixels, fp32: (mean, std), and the labels."""
    from diffusers import AutoencoderKL

    images, labels = pipeline.read_split(shard_dir, split)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    x = x.flip(-1) if flip else x
    with torch.no_grad():
        dist = AutoencoderKL.from_pretrained(str(folder)).eval().encode(x).latent_dist
    return np.stack([dist.mean.numpy(), dist.std.numpy()]), labels


def plain_webdataset(out: Path, split: str) -> list[dict]:
    """The few lines a user who wants only the files writes (README)."""
    urls = [str(out / s.name) for s in read_index(out).splits[split].shards]
    return list(wds.WebDataset(urls, shardshuffle=False).decode())


def test_every_image_is_encoded_once_with_diffusers_own_mean_and_read_back_by_plain_webdataset(
        folder, shards, tmp_path):
    out = tmp_path / "latents"
    options = EncodeOptions(samples_per_shard=5, batch_size=4, flip=True)  # 24 train images: 5 uneven groups
    index = encode_dataset(load_encoder(str(folder)), shards, out, options)
    assert index.scaling_factor == 1.5 and index.shift_factor == 0.25 and index.latents_std == STATS["std"]
    assert index.source["index_sha256"] == pipeline.index_sha256(shards)
    assert index.model == {"folder": str(folder.resolve())}
    assert index.latent_shape == (4, SIDE // 4, SIDE // 4) and index.dtype == "float16"
    assert {s: i.num_samples for s, i in index.splits.items()} == {"train": 24, "test": 8}
    assert len(index.splits["train"].shards) == 5 and not (out / ".encode").exists()
    for split in ("train", "test"):
        samples = plain_webdataset(out, split)
        (mean, std), labels = reference(folder, shards, split)
        (mean_flip, _), _ = reference(folder, shards, split, flip=True)
        assert [s["__key__"] for s in samples] == [f"{split}-{i:09d}" for i in range(len(mean))]  # each once
        keys = [s["key.txt"] for s in samples]
        assert len(set(keys)) == len(keys) and all(k.endswith(".jpg") for k in keys)
        assert [s["cls"] for s in samples] == labels.tolist()
        got = np.stack([s["mean.npy"] for s in samples])
        assert got.dtype == np.float16 and got.shape == mean.shape
        np.testing.assert_allclose(got.astype(np.float32), mean, rtol=2e-3, atol=2e-3)  # fp16 rounding
        np.testing.assert_allclose(np.stack([s["std.npy"] for s in samples]).astype(np.float32), std,
                                   rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(np.stack([s["mean_flip.npy"] for s in samples]).astype(np.float32), mean_flip,
                                   rtol=2e-3, atol=2e-3)


def test_bf16_is_stored_as_its_raw_bits_and_restored_exactly(folder, shards, tmp_path):
    out = tmp_path / "latents"
    index = encode_dataset(load_encoder(str(folder)), shards, out,
                           EncodeOptions(splits=("test",), dtype="bfloat16", samples_per_shard=8))
    assert index.dtype == "bfloat16" and list(index.splits) == ["test"]
    samples = plain_webdataset(out, "test")
    stored = np.stack([s["mean.npy"] for s in samples])
    assert stored.dtype == np.uint16
    (mean, _), _ = reference(folder, shards, "test")
    got = restored(stored, "bfloat16")
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), torch.from_numpy(mean).bfloat16().float(), rtol=1e-2, atol=1e-2)


def test_a_killed_encode_leaves_no_index_and_resumes_keeping_finished_groups(folder, shards, tmp_path,
                                                                            monkeypatch):
    out = tmp_path / "latents"
    options = EncodeOptions(samples_per_shard=6, batch_size=4)
    encoder = load_encoder(str(folder))
    real = encode_module.encode_group
    calls = []

    def dies_at_the_third(*args, **kwargs):
        calls.append(args[3].shard_name)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the kill, after two groups finished
        return real(*args, **kwargs)

    monkeypatch.setattr(encode_module, "encode_group", dies_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        encode_dataset(encoder, shards, out, options)
    assert not (out / "index.json").exists()  # incomplete: readers refuse it
    with pytest.raises(FileNotFoundError, match="not a complete latent directory"):
        read_index(out)
    finished = {name: (out / name).stat().st_mtime_ns for name in calls[:2]}
    monkeypatch.setattr(encode_module, "encode_group", real)
    index = encode_dataset(encoder, shards, out, options)
    # the two finished groups were kept, not written again
    assert {name: (out / name).stat().st_mtime_ns for name in finished} == finished
    fresh = encode_dataset(encoder, shards, tmp_path / "fresh", options)
    assert [s.sha256 for s in index.splits["train"].shards] == [s.sha256 for s in fresh.splits["train"].shards]
    with pytest.raises(FileExistsError, match="already holds a complete latent directory"):
        encode_dataset(encoder, shards, out, options)


@pytest.mark.parametrize("shards", ["encoded"], indirect=True)
def test_a_kill_inside_the_first_group_resumes_and_foreign_or_unfit_input_is_refused(folder, shards, tmp_path,
                                                                                    digits_shards):
    encoder = load_encoder(str(folder))
    out = tmp_path / "latents"
    real = encode_module.npy_bytes
    calls = []

    def dies_midway(array):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # inside group 0: its shard is half written under a temporary name
        return real(array)

    encode_module.npy_bytes = dies_midway
    try:
        with pytest.raises(KeyboardInterrupt):
            encode_dataset(encoder, shards, out, EncodeOptions(samples_per_shard=8))
    finally:
        encode_module.npy_bytes = real
    assert not list(out.glob("*.tar")) and not (out / "index.json").exists()
    index = encode_dataset(encoder, shards, out, EncodeOptions(samples_per_shard=8))
    assert index.splits["train"].num_samples == 24
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds files no encode of vaepipe wrote"):
        encode_dataset(encoder, shards, foreign)
    with pytest.raises(ValueError, match="1-channel images, the model encodes 3"):
        encode_dataset(encoder, digits_shards, tmp_path / "digits")
    with pytest.raises(ValueError, match="do not divide by the model's downsampling factor 4"):
        encode_dataset(encoder, shards, tmp_path / "odd", EncodeOptions(crop_size=(78, 78)))


@pytest.mark.parametrize("shards", ["encoded-blocks"], indirect=True)
def test_vaepipe_encode_writes_a_latent_directory_and_an_mlflow_run(folder, shards, tmp_path):
    out = tmp_path / "latents"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    result = run([str(BIN / "vaepipe"), "encode", str(folder), str(shards), str(out), "--samples-per-shard", "16",
                  "--flip"], env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    index = json.loads((out / "index.json").read_text())
    assert index["format"] == "vaepipe-latents" and index["flip"] and index["splits"]["train"]["num_samples"] == 24
    assert "wrote 32 latents" in result.stdout and "(experiment encode-latents)" in result.stdout
    again = run([str(BIN / "vaepipe"), "encode", str(folder), str(shards), str(out), "--no-track"], env=env,
                timeout=300)
    assert again.returncode == 1 and "already holds a complete latent directory" in again.stderr


@pytest.mark.parametrize("shards", ["encoded-blocks"], indirect=True)
def test_a_registered_version_encodes_and_its_encode_run_links_model_source_and_latents(shards, tracking_uri,
                                                                                        tmp_path):
    """models:/NAME/VERSION: the version's diffusers folder encodes (its latent statistics in index.json), and the
    MLflow run names the version, lists the source shards and the latent shards, and holds index.json."""
    import mlflow
    from support.registry import register_new

    from vae.latents.tracking import log_encode_run

    mlflow.set_tracking_uri(tracking_uri)
    torch.manual_seed(1)
    model = build_from_spec(SPEC).eval()
    client = mlflow.MlflowClient(tracking_uri)
    name = register_new(model, {**SPEC, "latent_stats": STATS}, tracking_uri, "encode-test")
    encoder = load_encoder(f"models:/{name}/1", tracking_uri)
    out = tmp_path / "latents"
    index = encode_dataset(encoder, shards, out, EncodeOptions(splits=("test",)))
    assert index.model == {"uri": f"models:/{name}/1", "name": name, "version": 1, "version_uri": f"models:/{name}/1"}
    assert index.scaling_factor == 1.5
    samples = plain_webdataset(out, "test")
    images, _ = pipeline.read_split(shards, "test")
    with torch.no_grad():
        expected = model.encode_latents(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).numpy()
    np.testing.assert_allclose(np.stack([s["mean.npy"] for s in samples]).astype(np.float32), expected,
                               rtol=2e-3, atol=2e-3)
    run_id = log_encode_run(index, out, tracking_uri)
    run_ = client.get_run(run_id)
    assert run_.info.status == "FINISHED"
    assert run_.data.tags["vaepipe.model.name"] == name and run_.data.tags["vaepipe.model.version"] == "1"
    assert run_.data.tags["vaepipe.source.index_sha256"] == pipeline.index_sha256(shards)
    contexts = {d.dataset.name: d.tags[0].value for d in run_.inputs.dataset_inputs}
    assert contexts == {"source-shards": "source", "latent-shards": "output"}
    version = client.get_model_version(name, "1")
    # a version registered with a logged model's id is linked by it too (this store's versions carry none: the tags
    # above are the link then)
    assert [m.model_id for m in run_.inputs.model_inputs] == ([version.model_id] if version.model_id else [])
    assert [a.path for a in client.list_artifacts(run_id)] == ["index.json"]


@pytest.mark.parametrize("shards", ["encoded-blocks"], indirect=True)
def test_the_encode_latents_flow_writes_the_directory_and_rewrites_it_byte_for_byte(folder, shards, tmp_path,
                                                                                    monkeypatch, prefect_api):
    """The flow, run in this process against the session's Prefect server: a task per group, index.json last; an
    encode is reproducible, so a rerun with overwrite gives the same shards (same sha256)."""
    from flows.encode_latents import encode_latents

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = tmp_path / "latents"
    options = EncodeOptions(samples_per_shard=10)
    index = encode_latents(str(folder), str(shards), str(out), options, track=False)
    assert index["splits"]["train"]["num_samples"] == 24 and len(index["splits"]["train"]["shards"]) == 3
    again = encode_latents(str(folder), str(shards), str(out), options, overwrite=True, track=False)
    assert again["splits"] == index["splits"]


@pytest.mark.parametrize("shards", ["encoded"], indirect=True)
def test_two_accelerate_ranks_encode_each_image_once_as_one_process_does(folder, shards, tmp_path):
    """`accelerate launch vaepipe encode` on two CPU ranks (gloo): each rank its groups, rank 0 the index; the
    same samples as one process, with the same means up to fp16 rounding (accelerate gives each CPU rank one
    thread, and the convolutions then sum in another order: a value may round to the next fp16)."""
    from conftest import free_port

    alone = encode_dataset(load_encoder(str(folder)), shards, tmp_path / "alone", EncodeOptions(samples_per_shard=7))
    out = tmp_path / "ranks"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    result = run([str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                  str(BIN / "vaepipe"), "encode", str(folder), str(shards), str(out), "--samples-per-shard", "7",
                  "--no-track"], env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("wrote 32 latents") == 1  # rank 0 alone reports
    index = read_index(out)
    for split in ("train", "test"):
        assert ([(s.name, s.num_samples) for s in index.splits[split].shards]
                == [(s.name, s.num_samples) for s in alone.splits[split].shards])
        ours, theirs = plain_webdataset(out, split), plain_webdataset(tmp_path / "alone", split)
        assert [(s["__key__"], s["key.txt"], s["cls"]) for s in ours] == [
            (s["__key__"], s["key.txt"], s["cls"]) for s in theirs]
        np.testing.assert_allclose(np.stack([s["mean.npy"] for s in ours]).astype(np.float32),
                                   np.stack([s["mean.npy"] for s in theirs]).astype(np.float32), rtol=2e-3, atol=2e-3)
