"""The real training entry point under `accelerate launch`, on CPU: files written, resume, DDP, precision."""

import json

import mlflow
import pytest
from conftest import REPO, SHARED_DATA, run

import pipeline
from vae.launch import accelerate_command

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


def meta(tmp_path, epoch):
    return json.loads((tmp_path / "run" / "checkpoints" / f"epoch-{epoch:04d}" / "meta.json").read_text())


def test_two_epochs_write_checkpoints_and_metrics(tmp_path, digits_shards, mlflow_uri):
    launch(tmp_path, digits_shards, "--train.epochs", "3", "--train.keep_checkpoints", "2")
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["epoch-0002", "epoch-0003"]  # the oldest was pruned
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
    assert f"(epoch 1, step {first['global_step']})" in result.stdout
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
    mnist = SHARED_DATA / "mnist"
    if not mnist.is_dir():
        pytest.skip(f"real MNIST not found at {mnist} (../shared/data is absent on this machine)")
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
    assert plots == {"latent_scatter.png", "manifold.png", "samples.png", "reconstructions.png"}
    client = mlflow.MlflowClient(mlflow_uri)
    run_id = meta(tmp_path, 2)["mlflow_run_id"]
    assert {a.path for a in client.list_artifacts(run_id, "plots")} == {f"plots/{p}" for p in plots}
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics) == {"val/elbo", "val/recon", "val/kl", "val/recon_mse"}
    assert client.get_model_version_by_alias(name, "champion").version == "1"
