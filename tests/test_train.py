"""The real training entry point under `accelerate launch`, on CPU: files written, resume, DDP, precision."""

import json
import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest
import torch
from conftest import REPO, run, shared_dataset

import pipeline
from vae.launch import accelerate_command
from vae.trainer import PREEMPTED_EXIT

PRESET = REPO / "infra/configs/digits.yaml"


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


def test_two_epochs_write_checkpoints_and_metrics(tmp_path, digits_shards, mlflow_uri):
    launch(tmp_path, digits_shards, "--train.epochs", "3", "--train.keep_checkpoints", "2")
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step-000000044", "step-000000066"]  # one per epoch; the oldest was pruned
    last = meta(tmp_path, 3)
    assert last["epoch"] == 3 and last["global_step"] == 3 * last["steps_per_epoch"] == 3 * (1438 // 64)
    assert last["config"]["train"]["epochs"] == 3
    assert (tmp_path / "run" / "config.yaml").is_file()
    client = mlflow.MlflowClient(mlflow_uri)
    history = client.get_metric_history(last["mlflow_run_id"], "val/elbo")
    assert [m.step for m in history] == [22, 44, 66]
    assert history[-1].value > history[0].value  # it learns
    metrics = client.get_run(last["mlflow_run_id"]).data.metrics
    assert {"train/loss", "train/elbo", "train/recon", "train/kl", "train/lr", "train/samples_per_s"} <= set(metrics)
    assert client.get_run(last["mlflow_run_id"]).data.params["model.arch"] == "conv"


def test_resume_continues_from_the_saved_epoch(tmp_path, digits_shards, mlflow_uri):
    launch(tmp_path, digits_shards, "--train.epochs", "1")
    first = meta(tmp_path, 1)
    result = launch(tmp_path, digits_shards, "--train.epochs", "2", "--train.resume", "true")
    assert f"(epoch 1, step {first['global_step']}," in result.stdout
    assert "epoch 1/2" not in result.stderr and "epoch 2/2" in result.stderr  # only the second epoch ran
    second = meta(tmp_path, 2)
    assert second["global_step"] == 2 * first["global_step"]
    assert second["mlflow_run_id"] == first["mlflow_run_id"]  # the resumed run logs into the same MLflow run
    steps = [m.step for m in mlflow.MlflowClient(mlflow_uri).get_metric_history(first["mlflow_run_id"], "val/elbo")]
    assert steps == [first["global_step"], second["global_step"]]


def test_a_finished_run_is_not_overwritten(tmp_path, digits_shards, mlflow_uri):
    launch(tmp_path, digits_shards, "--train.epochs", "1")
    argv, env = accelerate_command(PRESET, 1, overrides=["--ingest.shard_dir", str(digits_shards),
                                                         "--train.output_dir", str(tmp_path / "run")])
    result = run(argv, env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert "already holds checkpoints of an earlier run; pass --train.resume true" in result.stderr
    assert meta(tmp_path, 1)["epoch"] == 1  # untouched


def test_missing_shards_fail_with_the_fix(tmp_path, mlflow_uri):
    argv, env = accelerate_command(PRESET, 1, overrides=["--ingest.shard_dir", str(tmp_path / "none")])
    result = run(argv, env=env, cwd=tmp_path)
    assert result.returncode != 0
    assert "does not exist; run the ingest first" in result.stderr


@pytest.mark.slow
def test_two_cpu_ranks_average_gradients(tmp_path, digits_shards, mlflow_uri):
    launch(tmp_path, digits_shards, "--train.epochs", "1", processes=2)
    info = meta(tmp_path, 1)
    assert info["world_size"] == 2
    # Each rank trained on its own half of the data; identical weights after every step are only possible
    # when DDP averaged the gradients before the optimiser step.
    first, second = info["rank_param_checksums"]
    assert first == second
    assert info["steps_per_epoch"] == 1438 // (2 * 64)


def test_expected_world_size_is_checked(tmp_path, digits_shards, mlflow_uri):
    argv, env = accelerate_command(PRESET, 1, overrides=["--ingest.shard_dir", str(digits_shards),
                                                         "--train.expected_world_size", "2"])
    # accelerate_command put its own expected size first; the later override wins, as on any command line
    result = run(argv, env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert "expected 2 processes but the launcher started 1" in result.stderr


def test_bf16_mixed_precision(tmp_path, digits_shards, mlflow_uri):
    launch(tmp_path, digits_shards, "--train.epochs", "1", "--train.mixed_precision", "bf16")
    assert meta(tmp_path, 1)["val"]["val/elbo"] > -60  # finite, and near the fp32 figure (~ -28 after an epoch)


@pytest.mark.slow
def test_real_mnist_one_epoch(tmp_path, mlflow_uri):
    mnist = shared_dataset("mnist")
    shards = tmp_path / "shards"
    pipeline.ingest("idx", {"root": str(mnist)}, shards, progress=False)
    argv, env = accelerate_command(
        REPO / "infra/configs/mnist.yaml", 1,
        overrides=["--source.options.root", str(mnist), "--ingest.shard_dir", str(shards), "--model.arch", "mlp",
                   "--train.epochs", "1", "--train.output_dir", str(tmp_path / "run"), "--tracking.finalize", "false"],
    )
    result = run(argv, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    val = meta(tmp_path, 1)["val"]
    # An untrained model scores about -543 nats; one epoch of the MLP VAE reaches about -170.
    assert val["val/elbo"] > -200
    assert val["val/recon_mse"] < 0.07


def test_finalize_evaluates_plots_and_registers(tmp_path, digits_shards, mlflow_uri):
    import uuid

    name = f"vae-test-{uuid.uuid4().hex[:8]}"
    result = launch(tmp_path, digits_shards, "--train.epochs", "2", "--tracking.model_name", name, finalize=True)
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
    assert champion.tags["shard_index_sha256"] == pipeline.index_sha256(digits_shards)
    assert champion.tags["config_sha256"] and champion.tags["git_commit"]


def direct(tmp_path, shard_dir, run, *overrides):
    """vae/train.py in one process without a launcher (Accelerate then runs single-process): its own exit code."""
    return [sys.executable, str(REPO / "vae/train.py"), "--config", str(PRESET), "--ingest.shard_dir", str(shard_dir),
            "--train.output_dir", str(tmp_path / run), "--tracking.finalize", "false", *overrides]


def weights(tmp_path, run):
    from safetensors.torch import load_file

    newest = sorted((tmp_path / run / "checkpoints").glob("*/meta.json"))[-1].parent
    return load_file(newest / "model.safetensors")


@pytest.mark.parametrize("optimizer", ["adam", "lamb", "muon", "adam+deferred"])
def test_sigterm_mid_epoch_checkpoints_and_resumes_exactly(tmp_path, digits_shards, mlflow_uri, optimizer):
    # "+deferred": the step checks on the device, flags (the preemption too) read one step late (vae/step_guard.py)
    name, _, deferred = optimizer.partition("+")
    args = ["--train.epochs", "1", "--train.batch_size", "16", "--train.ema_decay", "0.9",
            "--optim.warmup_steps", "10", "--optim.schedule", "cosine", "--optim.name", name,
            "--train.deferred_step_check", str(bool(deferred)).lower()]
    whole = run(direct(tmp_path, digits_shards, "whole", *args), cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]

    proc = subprocess.Popen(direct(tmp_path, digits_shards, "cut", *args), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    config = tmp_path / "cut" / "config.yaml"  # written just before training starts
    deadline = time.monotonic() + 120
    while not config.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT, err[-3000:]
    cut = meta(tmp_path, run="cut")
    assert cut["reason"] == "preempted"
    assert 0 < cut["loader"]["position"] < cut["steps_per_epoch"]  # really mid-epoch
    assert "resume with --train.resume true" in out

    resumed = run(direct(tmp_path, digits_shards, "cut", *args, "--train.resume", "true"), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"loader at batch {cut['loader']['position']} of epoch 1" in resumed.stdout
    expected, got = weights(tmp_path, "whole"), weights(tmp_path, "cut")
    assert meta(tmp_path, run="cut")["global_step"] == meta(tmp_path, run="whole")["global_step"]
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name  # bit for bit, not merely close


@pytest.mark.parametrize("deferred", ["false", "true"])
def test_nonfinite_steps_are_skipped_then_the_run_stops(tmp_path, digits_shards, mlflow_uri, deferred):
    # lr 1e30: the first update blows the weights up, every later gradient is NaN or inf
    result = run(direct(tmp_path, digits_shards, "run", "--optim.lr", "1e30", "--train.max_nonfinite_steps", "3",
                        "--train.deferred_step_check", deferred), cwd=tmp_path)
    assert result.returncode == 1
    assert "3 optimiser steps in a row had non-finite gradients" in result.stderr
    assert "lower optim.lr, set optim.grad_clip" in result.stderr


def test_gradient_accumulation_and_lr_scaling(tmp_path, digits_shards, mlflow_uri):
    launch(tmp_path, digits_shards, "--train.epochs", "1", "--train.gradient_accumulation_steps", "2",
           "--optim.lr_scaling", "linear", "--optim.reference_batch", "64")
    info = meta(tmp_path)
    assert info["steps_per_epoch"] == (1438 // 64) // 2 and info["global_batch"] == 128
    history = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_metric_history(info["mlflow_run_id"],
                                                                                          "train/lr")
    assert history[-1].value == pytest.approx(2e-3)  # 1e-3 tuned at batch 64, scaled linearly to 128


@pytest.mark.slow
def test_two_machines_on_loopback(tmp_path, digits_shards, mlflow_uri):
    """Two "machines" of one CPU rank each, rendezvousing over 127.0.0.1 like a multi-node job."""
    from conftest import free_port

    port = free_port()
    procs = []
    for machine in (0, 1):
        argv = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
                "--num_processes", "2", "--machine_rank", str(machine), "--main_process_ip", "127.0.0.1",
                "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
                str(REPO / "vae/train.py"), "--config", str(PRESET), "--ingest.shard_dir", str(digits_shards),
                "--train.output_dir", str(tmp_path / "run"), "--train.epochs", "1", "--tracking.finalize", "false",
                "--train.expected_world_size", "2"]
        procs.append(subprocess.Popen(argv, cwd=tmp_path, env={**os.environ, "ACCELERATE_USE_CPU": "1"},
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    info = meta(tmp_path)
    assert info["world_size"] == 2 and len(set(info["rank_param_checksums"])) == 1


def test_channels_last(tmp_path, digits_shards, mlflow_uri):
    launch(tmp_path, digits_shards, "--train.epochs", "1", "--train.channels_last", "true")
    assert meta(tmp_path)["val"]["val/elbo"] > -60


@pytest.mark.slow
def test_torch_compile(tmp_path, digits_shards, mlflow_uri):
    launch(tmp_path, digits_shards, "--train.epochs", "1", "--train.compile", "true")
    assert meta(tmp_path)["val"]["val/elbo"] > -60
    from vae.config import load_config
    from vae.finalize import load_trained  # compiled in place: the checkpoint loads into a plain module

    cfg = load_config(PRESET, ["--ingest.shard_dir", str(digits_shards), "--train.output_dir", str(tmp_path / "run")])
    model, _ = load_trained(cfg)
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("preset", sorted((REPO / "infra/accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_presets_load(preset):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(preset))
    assert config.mixed_precision == "bf16" and config.num_processes >= 1
