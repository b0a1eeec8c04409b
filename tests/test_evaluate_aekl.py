"""`vaepipe evaluate` (issue 25 item 2): tiny random aekl diffusers folders scored on a small shard directory under
one protocol; PSNR's uint8 definition by hand; mode against sample; metrics without weights absent with the reason;
rFID's real statistics cached and reused; bad input refused in one line."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import mlflow
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from support.inception import random_inception_file
from support.registry import register_new
from torchvision.models import alexnet

import pipeline
from flows.cli import main
from vae.evaluation import EvaluateOptions, evaluate_models
from vae.models.base import Gaussian
from vae.models.spec import build_from_spec, model_spec
from vae.objectives.aekl.evaluation import aekl_sums
from vae.objectives.aekl.fid import INCEPTION_FILE
from vae.registry.diffusers import export_diffusers

SIDE = 32  # LPIPS(alex) takes 32 px and up
SPEC = model_spec("aekl", (3, SIDE, SIDE), 4, channels=[8, 16, 16], layers_per_block=1, norm_groups=4,
                  attention=False, likelihood="gaussian")
STATS = {"shift_factor": 0.0, "scaling_factor": 1.0, "mean": [0.0] * 4, "std": [1.0] * 4}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """12 random 32x32 RGB images in each of train and test."""
    root = tmp_path_factory.mktemp("evaluate")
    np.save(root / "images.npy", np.random.default_rng(0).integers(0, 256, (12, SIDE, SIDE, 3), dtype=np.uint8))
    files = {"train": str(root / "images.npy"), "test": str(root / "images.npy")}
    pipeline.ingest("arrays", {"files": files}, root / "shards", 4, 2, progress=False)
    return root / "shards"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> list[str]:
    """Two tiny random aekl models as diffusers folders (A and B)."""
    root = tmp_path_factory.mktemp("models")
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        out.append(str(export_diffusers(build_from_spec(SPEC).eval(), root / f"vae-{'ab'[seed]}", STATS)))
    return out


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    """A torch hub cache with no LPIPS or Inception weights in it."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


def test_evaluate_a_b_prints_one_table_two_runs_with_equal_protocol_params_and_the_protocol_on_disk(
        shards, folders, tmp_path, no_weights, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    assert main(["evaluate", *folders, "--shards", str(shards), "--count", "10", "--batch-size", "4", "--out",
                 str(out), "--tracking-uri", uri, "--cache-dir", str(tmp_path / "cache")]) == 0
    printed = capsys.readouterr().out.splitlines()
    saved = json.loads((out / "evaluation.json").read_text())
    protocol = saved["protocol"]
    assert printed[0].startswith(f"protocol {saved['protocol_sha256'][:12]}: test split, 10 images at 32x32")
    assert printed[1].split() == ["model", "PSNR", "(dB)", "SSIM", "LPIPS", "rFID"]
    rows = [line.split() for line in printed[2:4]]
    assert [r[0] for r in rows] == folders and all(r[3:5] == ["absent", "absent"] for r in rows)
    assert [float(r[1]) for r in rows] == [round(m["metrics"]["psnr"], 3) for m in saved["models"]]
    assert (protocol["split"], protocol["count"], protocol["resolution"], protocol["posterior"]) == (
        "test", 10, [32, 32], "mode")
    assert protocol["shard_index_sha256"] == pipeline.index_sha256(shards)
    client = mlflow.MlflowClient(uri)
    runs = [client.get_run(m["run_id"]) for m in saved["models"]]
    params = [{k: v for k, v in r.data.params.items() if k.startswith("protocol.")} for r in runs]
    assert params[0] == params[1] and params[0]["protocol.count"] == "10" and len(params[0]) == len(protocol)
    assert {r.data.tags["eval_protocol_sha256"] for r in runs} == {saved["protocol_sha256"]}
    assert [r.data.metrics["eval/psnr"] for r in runs] == [m["metrics"]["psnr"] for m in saved["models"]]
    assert all("eval/lpips" not in r.data.metrics for r in runs)
    assert [r.data.tags["vaepipe.model.folder"] for r in runs] == [str(Path(f).resolve()) for f in folders]
    assert [d.tags[0].value for r in runs for d in r.inputs.dataset_inputs] == ["evaluation", "evaluation"]


class Offset(torch.nn.Module):
    """A stand-in autoencoder whose reconstruction of image i is the image plus (i + 0.6) / 255: on uint8 every
    pixel of image i is off by i + 1."""

    def posterior(self, x: torch.Tensor) -> Gaussian:
        return Gaussian(x, torch.zeros_like(x))

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        return z + (torch.arange(len(z)).view(-1, 1, 1, 1) + 0.6) / 255


def test_psnr_is_taken_per_image_on_uint8_as_a_hand_computation_gives():
    images = torch.from_numpy(np.random.default_rng(1).integers(0, 252, (3, 3, 8, 8), dtype=np.uint8))
    sums, _ = aekl_sums(Offset(), [images], "cpu")
    # both rounded to uint8, image i is off by i + 1 everywhere: MSE (i + 1)^2, PSNR 20 log10(255 / (i + 1)),
    # averaged over the three images (floats would give 10 log10(255^2 / (i + 0.6)^2): 52.6 dB for the first)
    by_hand = np.mean([20 * np.log10(255 / (i + 1)) for i in range(3)])
    assert sums[0].item() / sums[3].item() == pytest.approx(by_hand, abs=1e-5)
    assert by_hand != pytest.approx(10 * np.log10(255**2 / np.mean([(i + 1) ** 2 for i in range(3)])), abs=0.1)


def test_posterior_mode_and_sample_give_different_numbers_and_protocols_and_a_seed_repeats(shards, folders,
                                                                                         no_weights):
    def run(posterior: str, seed: int = 0):
        options = EvaluateOptions(count=8, batch_size=4, posterior=posterior, seed=seed)
        return evaluate_models(folders[:1], shards, options=options, track=False)

    mode, sample, again, other = run("mode"), run("sample", 3), run("sample", 3), run("sample", 4)
    assert mode.models[0]["metrics"]["psnr"] != sample.models[0]["metrics"]["psnr"]
    assert sample.models[0]["metrics"] == again.models[0]["metrics"]  # seeded draws
    assert other.models[0]["metrics"]["psnr"] != sample.models[0]["metrics"]["psnr"]
    assert (mode.protocol.posterior, mode.protocol.seed) == ("mode", None)
    assert (sample.protocol.posterior, sample.protocol.seed) == ("sample", 3)
    assert len({mode.protocol.digest(), sample.protocol.digest(), other.protocol.digest()}) == 3
    # the latent statistics are the posterior mean's either way
    assert mode.models[0]["latents"] == sample.models[0]["latents"]


def test_a_metric_without_weights_is_absent_with_its_reason_never_a_number(shards, folders, no_weights, tmp_path):
    result = evaluate_models(folders[:1], shards, tmp_path, EvaluateOptions(count=4), track=False)
    metrics = result.models[0]["metrics"]
    assert "lpips" not in metrics and "rfid" not in metrics and metrics["psnr"] > 0
    assert "alexnet-owt-7be5be79.pth" in result.absent["lpips"] and INCEPTION_FILE in result.absent["rfid"]
    assert result.protocol.lpips.startswith("absent:") and result.protocol.fid.startswith("absent:")
    assert json.loads((tmp_path / "evaluation.json").read_text())["absent"] == result.absent


def test_lpips_alexnet_reads_its_backbone_from_a_local_file_and_says_so(shards, folders, no_weights, tmp_path):
    torch.manual_seed(0)
    save_file(alexnet(weights=None).state_dict(), tmp_path / "alexnet.safetensors")  # random, torchvision's names
    options = EvaluateOptions(count=4, lpips_weights=str(tmp_path / "alexnet.safetensors"))
    result = evaluate_models(folders[:1], shards, options=options, track=False)
    assert result.models[0]["metrics"]["lpips"] > 0 and "lpips" not in result.absent
    assert result.protocol.lpips.startswith("alex: lpips 0.1.4") and "alexnet.safetensors" in result.protocol.lpips
    vgg = evaluate_models(folders[:1], shards, options=EvaluateOptions(count=4, lpips="vgg"), track=False)
    assert "vgg16-397923af.pth" in vgg.absent["lpips"]  # the training loss's network, asked for by name


@pytest.fixture
def inception(tmp_path, monkeypatch) -> Path:
    """Stand-in Inception weights in torch-fidelity's file, in this test's torch hub cache (tests/support)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return random_inception_file(tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_FILE)


@pytest.mark.slow  # three FIDs of 2048 features: ~60 s on a loaded 2-core machine
def test_rfid_reference_statistics_are_cached_and_a_second_model_reuses_them_with_the_same_fid(
        shards, folders, inception, tmp_path):
    from torchmetrics.image.fid import FrechetInceptionDistance

    reals = []
    update = FrechetInceptionDistance.update

    def counted(self, imgs, real):
        reals.append(real)
        return update(self, imgs, real)

    options = EvaluateOptions(count=4, batch_size=2, lpips="none", cache_dir=tmp_path / "cache")
    with mock.patch.object(FrechetInceptionDistance, "update", counted):
        first = evaluate_models(folders[:1], shards, options=options, track=False)
        assert reals.count(True) == 2 and not first.models[0]["fid_reference"]["cached"]
        reals.clear()
        second = evaluate_models(folders[1:], shards, options=options, track=False)
        assert reals == [False, False]  # the reals came from the cache: only reconstructions went through Inception
    assert second.models[0]["fid_reference"] == {"file": first.models[0]["fid_reference"]["file"], "cached": True}
    assert list((tmp_path / "cache").glob("fid-reference-*.safetensors")) == [
        Path(first.models[0]["fid_reference"]["file"])]
    fresh = options.model_copy(update={"cache_dir": tmp_path / "fresh"})
    uncached = evaluate_models(folders[1:], shards, options=fresh, track=False)
    assert not uncached.models[0]["fid_reference"]["cached"]
    assert second.models[0]["metrics"]["rfid"] == pytest.approx(uncached.models[0]["metrics"]["rfid"], rel=1e-6)
    # a real distance (the stand-in's features vary with the image), and the two models' differ
    assert first.models[0]["metrics"]["rfid"] > 1e-3 and second.models[0]["metrics"]["rfid"] > 1e-3
    assert first.models[0]["metrics"]["rfid"] != pytest.approx(second.models[0]["metrics"]["rfid"], rel=1e-3)
    assert second.protocol.fid.startswith("torchmetrics") and INCEPTION_FILE in second.protocol.fid


def test_a_registered_version_is_evaluated_and_its_run_names_the_version(shards, tmp_path, no_weights):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    torch.manual_seed(0)
    model = build_from_spec(SPEC).eval()
    client = mlflow.MlflowClient(uri)
    name = register_new(model, {**SPEC, "latent_stats": STATS}, uri, "evaluate-test")
    result = evaluate_models([f"models:/{name}/1"], shards, options=EvaluateOptions(count=4), tracking_uri=uri)
    entry = result.models[0]
    assert entry["provenance"] == {"uri": f"models:/{name}/1", "name": name, "version": 1,
                                   "version_uri": f"models:/{name}/1"}
    run = client.get_run(entry["run_id"])
    assert run.data.tags["vaepipe.model.name"] == name and run.data.tags["vaepipe.model.version"] == "1"
    version = client.get_model_version(name, "1")  # linked by its logged model's id where the store keeps one
    assert [m.model_id for m in run.inputs.model_inputs] == ([version.model_id] if version.model_id else [])
    assert [d.dataset.digest for d in run.inputs.dataset_inputs] == [pipeline.index_sha256(shards)[:32]]
    folder = evaluate_models([str(export_diffusers(model, tmp_path / "same", STATS))], shards,
                             options=EvaluateOptions(count=4), track=False)
    assert folder.models[0]["metrics"] == entry["metrics"]  # the registered weights, not others


def test_the_command_is_in_vaepipe_help_with_its_options(capsys):
    with pytest.raises(SystemExit) as done:
        main(["evaluate", "--help"])
    assert done.value.code == 0
    shown = capsys.readouterr().out
    for option in ("--shards", "--split", "--count", "--posterior", "--lpips", "--out", "--batch-size", "--device"):
        assert option in shown
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "evaluate" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["no shards", "no such model", "not aekl", "registered conv", "count too large",
                                  "no such split", "images too small"])
def test_bad_input_is_refused_in_one_line_naming_the_problem(case, shards, folders, tmp_path, capsys):
    model, where, extra = folders[0], str(shards), []
    if case == "no shards":
        where = str(tmp_path / "nowhere")
    elif case == "no such model":
        model = str(tmp_path / "vae-typo")
    elif case == "not aekl":
        model = str(tmp_path / "unet")
        Path(model).mkdir()
        (Path(model) / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    elif case == "registered conv":  # a registered version of another architecture carries no diffusers folder
        from vae.registry.packaging import log_model
        from vae.registry.versions import register_version
        from vae.tracking.store import ensure_experiment

        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        mlflow.set_tracking_uri(uri)
        run_id = mlflow.MlflowClient(uri).create_run(ensure_experiment("evaluate-test", uri)).info.run_id
        spec = model_spec("conv", (3, SIDE, SIDE), 2)
        register_version(log_model(build_from_spec(spec).eval(), spec, run_id), "conv-model", 100.0, run_id)
        model, extra = "models:/conv-model/1", ["--tracking-uri", uri]
        capsys.readouterr()  # the setup's MLflow logs: only the command's output is checked
    elif case == "count too large":
        extra = ["--count", "13"]
    elif case == "no such split":
        extra = ["--split", "val"]
    else:
        np.save(tmp_path / "small.npy", np.zeros((4, 16, 16, 3), dtype=np.uint8))
        where = str(tmp_path / "small")
        pipeline.ingest("arrays", {"files": {"test": str(tmp_path / "small.npy")}}, where, 4, 2, progress=False)
    assert main(["evaluate", model, "--shards", where, "--no-track", "--out", str(tmp_path / "out"), *extra]) == 1
    lines = capsys.readouterr().err.strip().splitlines()  # above it, at most MLflow's download progress bar
    err = lines[-1]
    assert err.startswith("error: ") and [line for line in lines if line.startswith("error")] == [err]
    expected = {"no shards": "does not exist; run the ingest first", "no such model": f"{tmp_path / 'vae-typo'} is "
                "neither models:/NAME@ALIAS, models:/NAME/VERSION nor a diffusers folder (config.json + ",
                "not aekl": "holds a UNet2DModel, not an "
                "AutoencoderKL", "registered conv": "models:/conv-model/1 cannot be evaluated: conv-model version 1 "
                "carries no diffusers folder: only model.arch aekl exports one",
                "count too large": "--count 13 is more than the 12 images of split 'test'",
                "no such split": "has no split 'val'",
                "images too small": "LPIPS(alex) takes images of at least 32 px a side, these are 16x16: pass "
                "--lpips none"}[case]
    assert expected in err
    assert not (tmp_path / "out" / "evaluation.json").exists()


def test_a_centre_crop_scores_as_the_same_images_ingested_cropped_and_the_protocol_says_so(
        shards, folders, tmp_path, no_weights):
    """`--crop-size` reproduces a run trained with data.crop_size: the loader's centre crop, named in the protocol."""
    images = np.random.default_rng(0).integers(0, 256, (12, SIDE, SIDE, 3), dtype=np.uint8)  # the fixture's
    top, left = (SIDE - 16) // 2, (SIDE - 24) // 2
    np.save(tmp_path / "cropped.npy", np.ascontiguousarray(images[:, top:top + 16, left:left + 24]))
    cropped = tmp_path / "cropped"
    pipeline.ingest("arrays", {"files": {"test": str(tmp_path / "cropped.npy")}}, cropped, 4, 2, progress=False)
    options = dict(count=8, lpips="none", batch_size=4)
    by_crop = evaluate_models(folders[:1], shards, options=EvaluateOptions(crop_size=(16, 24), **options), track=False)
    as_stored = evaluate_models(folders[:1], cropped, options=EvaluateOptions(**options), track=False)
    ours, theirs = by_crop.protocol, as_stored.protocol
    assert (ours.crop, ours.resolution, theirs.crop) == ("centre 16x24", (16, 24), "none: whole image")
    np.testing.assert_allclose([by_crop.models[0]["metrics"][k] for k in ("psnr", "ssim")],
                               [as_stored.models[0]["metrics"][k] for k in ("psnr", "ssim")], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"--crop-size 40 8 does not fit the 32x32 images .*at most 32 32"):
        evaluate_models(folders[:1], shards, options=EvaluateOptions(crop_size=(40, 8), **options), track=False)
