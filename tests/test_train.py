"""The training entry point on CPU. In this process (tests/support/training.py) where the subject is what training
does: files written, metrics, resume, precision, memory layout, compilation, preemption at a known step, the stop on
non-finite gradients. Under `accelerate launch` where it is the boundary: the world size the launcher made, DDP
across two ranks and two "machines", the exit status and message a user sees, the launched post-training path."""

import json
import math
import os
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import torch
from conftest import REPO, run, shared_dataset
from support import training
from support.training import in_process

import pipeline
from pipeline import ShardFormatError
from vae.launch.command import accelerate_command
from vae.training.errors import TrainingError
from vae.training.preemption import PREEMPTED_EXIT
from vae.training.trainer import Trainer

PRESET = training.PRESET
DIGITS_BATCH = ["--train.batch_size", "64"]  # the preset's own batch after FAST's
FEW = 320  # training images of `few_digits`: 5 steps of 64 per epoch


@pytest.fixture(scope="module")
def few_digits(tmp_path_factory, digits_shards):
    """The first 320 training and 64 test images of the session's digits, for the in-process runs whose subject is
    not the amount of data: a whole digits epoch (1438 images) costs 4.5x as much on a loaded 2-core machine."""
    root = tmp_path_factory.mktemp("few-digits")
    files, labels = {}, {}
    for split, n in (("train", FEW), ("test", 64)):
        images, y = pipeline.read_split(digits_shards, split)
        files[split], labels[split] = root / f"{split}.npy", root / f"{split}-labels.npy"
        np.save(files[split], images[:n])
        np.save(labels[split], y[:n])
    options = {"files": {k: str(v) for k, v in files.items()}, "labels": {k: str(v) for k, v in labels.items()},
               "layout": "NHWC"}
    pipeline.ingest("arrays", options, root / "shards", 128, 64, progress=False)
    return root / "shards"


def launch(tmp_path, shard_dir, *overrides, processes=1, finalize=False):
    argv, env = accelerate_command(
        PRESET, processes,
        overrides=["--ingest.shard_dir", str(shard_dir), "--train.output_dir", str(tmp_path / "run"),
                   "--tracking.finalize", str(finalize).lower(), "--train.log_every", "5", *overrides],
    )
    result = run(argv, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def meta(tmp_path, epoch=None, run="run"):
    """meta.json of the newest checkpoint, or of the one written at the end of `epoch`."""
    metas = [json.loads(p.read_text()) for p in sorted((tmp_path / run / "checkpoints").glob("*/meta.json"))]
    if epoch is None:
        return metas[-1]
    return next(m for m in metas if m["epoch"] == epoch and m["reason"] == "end of epoch")


def train(tmp_path, shard_dir, *overrides, run="run"):
    """vae.training.trainer.train in this process (call inside `in_process`); the digits preset's batch of 64 unless
    `overrides` name another."""
    training.train(shard_dir, tmp_path / run, "--train.log_every", "5", *DIGITS_BATCH, *overrides)


@pytest.fixture
def trainers(monkeypatch):
    """Every Trainer built in this test, in order (to look at its models after the run)."""
    built = []
    init = Trainer.__init__

    def recording(self, *args, **kwargs):
        init(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(Trainer, "__init__", recording)
    return built


def test_epochs_write_checkpoints_pruned_to_keep_and_their_metrics(tmp_path, few_digits, tracking_uri):
    with in_process(tracking_uri):
        train(tmp_path, few_digits, "--train.epochs", "3", "--train.keep_checkpoints", "2")
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step-000000010", "step-000000015"]  # one per epoch; the oldest was pruned
    last = meta(tmp_path, 3)
    assert last["epoch"] == 3 and last["global_step"] == 3 * last["steps_per_epoch"] == 3 * (FEW // 64)
    assert last["config"]["train"]["epochs"] == 3
    assert (tmp_path / "run" / "config.yaml").is_file()
    client = mlflow.MlflowClient(tracking_uri)
    history = client.get_metric_history(last["mlflow_run_id"], "val/elbo")
    assert [m.step for m in history] == [5, 10, 15]
    assert history[-1].value > history[0].value  # it learns
    metrics = client.get_run(last["mlflow_run_id"]).data.metrics
    assert {"train/loss", "train/elbo", "train/recon", "train/kl", "train/lr", "train/samples_per_s"} <= set(metrics)
    assert client.get_run(last["mlflow_run_id"]).data.params["model.arch"] == "conv"


def test_resume_continues_from_the_saved_epoch(tmp_path, few_digits, tracking_uri, capsys):
    with in_process(tracking_uri):
        train(tmp_path, few_digits, "--train.epochs", "1")
    first = meta(tmp_path, 1)
    capsys.readouterr()
    with in_process(tracking_uri):
        train(tmp_path, few_digits, "--train.epochs", "2", "--train.resume", "true")
    out, err = capsys.readouterr()
    assert f"(epoch 1, step {first['global_step']}," in out
    assert "epoch 1/2" not in err and "epoch 2/2" in err  # only the second epoch ran (its progress bar)
    second = meta(tmp_path, 2)
    assert second["global_step"] == 2 * first["global_step"]
    assert second["mlflow_run_id"] == first["mlflow_run_id"]  # the resumed run logs into the same MLflow run
    steps = [m.step for m in mlflow.MlflowClient(tracking_uri).get_metric_history(first["mlflow_run_id"], "val/elbo")]
    assert steps == [first["global_step"], second["global_step"]]


def test_a_finished_run_is_not_overwritten(tmp_path, few_digits, tracking_uri):
    with in_process(tracking_uri):
        train(tmp_path, few_digits, "--train.epochs", "1")
        refusal = "already holds checkpoints of an earlier run; pass --train.resume true"
        with pytest.raises(TrainingError, match=refusal):
            train(tmp_path, few_digits, "--train.epochs", "1")
    assert meta(tmp_path, 1)["epoch"] == 1  # untouched
    assert len(list((tmp_path / "run" / "checkpoints").iterdir())) == 1


def test_missing_shards_stop_the_entry_point_with_the_fix(tmp_path, tracking_uri, capsys):
    """vae/train.py's main turns the loader's error into one line on stderr and exit status 1, no traceback."""
    from vae.train import main

    with in_process(tracking_uri), pytest.raises(SystemExit) as stopped:
        main(["--config", str(PRESET), "--ingest.shard_dir", str(tmp_path / "none"),
              "--train.output_dir", str(tmp_path / "run")])
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    assert "error: " in err and "does not exist; run the ingest first" in err and "Traceback" not in err
    with pytest.raises(ShardFormatError):  # what main caught: the loader's own error type
        training.train(tmp_path / "none", tmp_path / "run")


@pytest.mark.slow
def test_two_cpu_ranks_average_gradients(tmp_path, few_digits, mlflow_uri):
    launch(tmp_path, few_digits, "--train.epochs", "1", processes=2)
    info = meta(tmp_path, 1)
    assert info["world_size"] == 2
    # Each rank trained on its own half of the data; identical weights after every step are only possible
    # when DDP averaged the gradients before the optimiser step.
    first, second = info["rank_param_checksums"]
    assert first == second
    assert info["steps_per_epoch"] == FEW // (2 * 64)


def test_expected_world_size_is_checked_against_the_launcher(tmp_path, digits_shards, mlflow_uri):
    argv, env = accelerate_command(PRESET, 1, overrides=["--ingest.shard_dir", str(digits_shards),
                                                         "--train.expected_world_size", "2"])
    # accelerate_command put its own expected size first; the later override wins, as on any command line
    result = run(argv, env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert "expected 2 processes but the launcher started 1" in result.stderr


def conv_layers(trainer: Trainer) -> list[torch.nn.Conv2d]:
    model = trainer.accelerator.unwrap_model(trainer.models["model"])
    return [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


def test_bf16_mixed_precision_runs_the_forward_in_bf16_and_keeps_fp32_weights(tmp_path, few_digits, tracking_uri,
                                                                             trainers):
    seen = []  # the dtype each conv returns in the training forwards: bf16 only where autocast is on
    with in_process(tracking_uri):
        hook = torch.nn.modules.module.register_module_forward_hook(
            lambda module, args, out: seen.append(out.dtype)
            if isinstance(module, torch.nn.Conv2d) and module.training else None)
        try:
            train(tmp_path, few_digits, "--train.epochs", "1", "--train.mixed_precision", "bf16")
        finally:
            hook.remove()
        [trainer] = trainers
        assert trainer.accelerator.mixed_precision == "bf16"  # read before in_process resets Accelerate's state
    assert seen and set(seen) == {torch.bfloat16}
    assert {p.dtype for layer in conv_layers(trainer) for p in layer.parameters()} == {torch.float32}
    assert meta(tmp_path, 1)["val"]["val/elbo"] > -60  # finite, and near the fp32 figure (~ -28 after an epoch)


@pytest.fixture(scope="module")
def rgb_shards(tmp_path_factory):
    """64 train and 32 test random 8 x 8 RGB images: three channels, so NCHW and channels-last are different memory
    (with one channel, as in digits, the two layouts are the same bytes)."""
    root = tmp_path_factory.mktemp("rgb")
    rng = np.random.default_rng(0)
    files = {}
    for split, n in (("train", 64), ("test", 32)):
        np.save(root / f"{split}.npy", rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8))
        files[split] = str(root / f"{split}.npy")
    pipeline.ingest("arrays", {"files": files}, root / "shards", 64, 32, progress=False)
    return root / "shards"


def channels_last(t: torch.Tensor) -> bool:
    """Channels-last memory, and not NCHW memory where the two differ (more than one channel and one pixel)."""
    same_bytes = t.shape[1] == 1 or t.shape[2] * t.shape[3] == 1
    return t.is_contiguous(memory_format=torch.channels_last) and (same_bytes or not t.is_contiguous())


def test_channels_last_reaches_the_model_input_and_every_conv(tmp_path, rgb_shards, tracking_uri, trainers):
    inputs = []  # (module, input shape, whether the input was channels-last), training and validation alike
    with in_process(tracking_uri):
        hook = torch.nn.modules.module.register_module_forward_pre_hook(
            lambda module, args: inputs.append((module, tuple(args[0].shape), channels_last(args[0])))
            if isinstance(module, torch.nn.Conv2d) else None)
        try:
            train(tmp_path, rgb_shards, "--train.epochs", "1", "--train.batch_size", "16",
                  "--train.channels_last", "true")
        finally:
            hook.remove()
    [trainer] = trainers
    layers = conv_layers(trainer)
    assert layers and all(channels_last(layer.weight) for layer in layers)
    assert any(not layer.weight.is_contiguous() for layer in layers)  # some weights differ from NCHW
    first = layers[0]  # the encoder's first conv takes the model's input: 3 channels of 8 x 8, the layouts differ
    assert first.in_channels == 3 and not channels_last(torch.empty(1, 3, 8, 8))
    assert any(m is first and cl for m, _, cl in inputs)
    assert inputs and all(cl for _, _, cl in inputs), [(type(m).__name__, shape) for m, shape, cl in inputs if not cl]
    assert math.isfinite(meta(tmp_path, 1)["val"]["val/elbo"])


@pytest.mark.slow
def test_torch_compile_runs_the_steps_through_a_compiled_module(tmp_path, few_digits, tracking_uri, trainers):
    from torch._dynamo.utils import counters

    from vae.config import load_config
    from vae.training.trained import load_trained  # compiled in place: the checkpoint loads into a plain module

    torch._dynamo.reset()
    counters.clear()
    try:
        with in_process(tracking_uri):
            train(tmp_path, few_digits, "--train.epochs", "1", "--train.compile", "true")
        [trainer] = trainers
        model = trainer.accelerator.unwrap_model(trainer.models["model"])
        assert model._compiled_call_impl is not None  # nn.Module.compile: every call goes through it
        assert counters["stats"]["unique_graphs"] >= 1 and counters["frames"]["ok"] >= 1  # dynamo captured frames
    finally:
        torch._dynamo.reset()
    assert meta(tmp_path)["val"]["val/elbo"] > -60
    cfg = load_config(PRESET, ["--ingest.shard_dir", str(few_digits), "--train.output_dir", str(tmp_path / "run")])
    model, _ = load_trained(cfg.train.output_dir)
    assert sum(p.numel() for p in model.parameters()) > 0 and model._compiled_call_impl is None


@pytest.mark.slow
def test_real_mnist_one_epoch(tmp_path, tracking_uri):
    mnist = shared_dataset("mnist")
    shards = tmp_path / "shards"
    pipeline.ingest("idx", {"root": str(mnist)}, shards, progress=False)
    from vae.config import load_config
    from vae.training.trainer import train as run_training

    cfg = load_config(REPO / "infra/configs/mnist.yaml", [
        "--source.options.root", str(mnist), "--ingest.shard_dir", str(shards), "--model.arch", "mlp",
        "--train.epochs", "1", "--train.output_dir", str(tmp_path / "run"), "--tracking.finalize", "false"])
    with in_process(tracking_uri):
        run_training(cfg)
    val = meta(tmp_path, 1)["val"]
    # An untrained model scores about -543 nats; one epoch of the MLP VAE reaches about -170.
    assert val["val/elbo"] > -200
    assert val["val/recon_mse"] < 0.07


def test_finalize_evaluates_plots_and_registers(tmp_path, few_digits, mlflow_uri):
    import uuid

    name = f"vae-test-{uuid.uuid4().hex[:8]}"
    result = launch(tmp_path, few_digits, "--train.epochs", "2", "--tracking.model_name", name, finalize=True)
    assert f"registered models:/{name}/1 (champion: True)" in result.stdout
    plots = {p.name for p in (tmp_path / "run" / "plots").iterdir()}
    assert plots == {"latent_scatter.png", "manifold.png", "samples.png", "reconstructions.png", "temperatures.png",
                     "traversals.png", "interpolations.png"}
    client = mlflow.MlflowClient(mlflow_uri)
    run_id = meta(tmp_path, 2)["mlflow_run_id"]
    assert {a.path for a in client.list_artifacts(run_id, "plots")} == {f"plots/{p}" for p in plots}
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics) == {"val/elbo", "val/recon", "val/kl", "val/recon_mse", "val/nll_iwae", "val/bpd",
                            "val/active_units"}
    assert metrics["val/nll_iwae"] <= -metrics["val/elbo"] + 0.5  # the IWAE bound is tighter than the ELBO
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version == "1" and client.get_model_version_by_alias(name, "challenger").version == "1"
    assert float(champion.tags["val_nll"]) == metrics["val/nll_iwae"]  # the registry ranks versions on it
    assert champion.tags["shard_index_sha256"] == pipeline.index_sha256(few_digits)
    assert champion.tags["config_sha256"] and champion.tags["git_commit"]


def weights(tmp_path, run):
    from safetensors.torch import load_file

    newest = sorted((tmp_path / run / "checkpoints").glob("*/meta.json"))[-1].parent
    return load_file(newest / "model.safetensors")


SIGTERM_AT = 8  # an optimiser step in the middle of the epoch: 320 // 16 = 20 steps


@pytest.mark.parametrize("optimizer", ["adam", "lamb", "muon", "adam+deferred"])
def test_sigterm_mid_epoch_checkpoints_and_resumes_exactly(tmp_path, few_digits, tracking_uri, capsys,
                                                           optimizer):
    # "+deferred": the step checks on the device, flags (the preemption too) read one step late
    # (vae/training/step_guard.py)
    name, _, deferred = optimizer.partition("+")
    args = ["--train.epochs", "1", "--train.batch_size", "16", "--train.ema_decay", "0.9",
            "--optim.warmup_steps", "10", "--optim.schedule", "cosine", "--optim.name", name,
            "--train.deferred_step_check", str(bool(deferred)).lower()]
    with in_process(tracking_uri):
        train(tmp_path, few_digits, *args, run="whole")
    with in_process(tracking_uri, sigterm_at=SIGTERM_AT), pytest.raises(SystemExit) as stopped:
        train(tmp_path, few_digits, *args, run="cut")
    assert stopped.value.code == PREEMPTED_EXIT
    cut = meta(tmp_path, run="cut")
    assert cut["reason"] == "preempted"
    # the signalled step is finished (and, with the deferred check, the one after it, which reads its flag)
    assert cut["global_step"] == SIGTERM_AT + 1 + bool(deferred)
    assert 0 < cut["loader"]["position"] < cut["steps_per_epoch"]  # really mid-epoch
    assert "resume with --train.resume true" in capsys.readouterr().out

    with in_process(tracking_uri):
        train(tmp_path, few_digits, *args, "--train.resume", "true", run="cut")
    assert f"loader at batch {cut['loader']['position']} of epoch 1" in capsys.readouterr().out
    expected, got = weights(tmp_path, "whole"), weights(tmp_path, "cut")
    assert meta(tmp_path, run="cut")["global_step"] == meta(tmp_path, run="whole")["global_step"]
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key  # bit for bit, not merely close


@pytest.mark.parametrize("deferred", ["false", "true"])
def test_nonfinite_steps_are_skipped_then_the_run_stops(tmp_path, few_digits, tracking_uri, deferred):
    # lr 1e30: the first update blows the weights up, every later gradient is NaN or inf
    with in_process(tracking_uri), pytest.raises(TrainingError) as stopped:
        train(tmp_path, few_digits, "--optim.lr", "1e30", "--train.max_nonfinite_steps", "3",
              "--train.deferred_step_check", deferred)
    assert "3 optimiser steps in a row had non-finite gradients" in str(stopped.value)
    assert "lower optim.lr, set optim.grad_clip" in str(stopped.value)


def test_gradient_accumulation_and_lr_scaling(tmp_path, few_digits, tracking_uri):
    with in_process(tracking_uri):
        train(tmp_path, few_digits, "--train.epochs", "1", "--train.gradient_accumulation_steps", "2",
              "--optim.lr_scaling", "linear", "--optim.reference_batch", "64")
    info = meta(tmp_path)
    assert info["steps_per_epoch"] == (FEW // 64) // 2 and info["global_batch"] == 128
    history = mlflow.MlflowClient(tracking_uri).get_metric_history(info["mlflow_run_id"], "train/lr")
    assert history[-1].value == pytest.approx(2e-3)  # 1e-3 tuned at batch 64, scaled linearly to 128


@pytest.mark.slow
def test_two_machines_on_loopback(tmp_path, few_digits, mlflow_uri):
    """Two "machines" of one CPU rank each, rendezvousing over 127.0.0.1 like a multi-node job."""
    from conftest import free_port

    port = free_port()
    procs = []
    for machine in (0, 1):
        argv = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
                "--num_processes", "2", "--machine_rank", str(machine), "--main_process_ip", "127.0.0.1",
                "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
                str(REPO / "vae/train.py"), "--config", str(PRESET), "--ingest.shard_dir", str(few_digits),
                "--train.output_dir", str(tmp_path / "run"), "--train.epochs", "1", "--tracking.finalize", "false",
                "--train.expected_world_size", "2"]
        procs.append(subprocess.Popen(argv, cwd=tmp_path, env={**os.environ, "ACCELERATE_USE_CPU": "1"},
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    info = meta(tmp_path)
    assert info["world_size"] == 2 and len(set(info["rank_param_checksums"])) == 1


@pytest.mark.parametrize("preset", sorted((REPO / "infra/accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_presets_load(preset):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(preset))
    assert config.mixed_precision == "bf16" and config.num_processes >= 1
