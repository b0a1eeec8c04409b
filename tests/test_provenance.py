"""What a run tells a team in MLflow, read back through MlflowClient: datasets, source tags, system metrics, the
logged model's metrics and the model version's description (vae/tracking/provenance.py)."""

import json
import subprocess

import mlflow
from conftest import REPO, run

import pipeline
from vae.config import flatten, load_config
from vae.launch.command import accelerate_command
from vae.tracking.store import create_run

PRESET = REPO / "infra/configs/digits.yaml"


def head_commit() -> str:
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_a_new_run_names_its_datasets_and_its_source(tmp_path, digits_shards, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    cfg = load_config(PRESET, ["--ingest.shard_dir", str(digits_shards), "--tracking.tracking_uri", uri])
    run_id = create_run(cfg, tags={"prefect.flow_run.id": "abc"})
    client = mlflow.MlflowClient(uri)
    found = client.get_run(run_id)
    sha = pipeline.index_sha256(digits_shards)
    index = pipeline.read_index(digits_shards)
    inputs = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset
              for i in found.inputs.dataset_inputs}
    assert sorted(inputs) == ["training", "validation"]
    for context, split in (("training", "train"), ("validation", "test")):
        dataset = inputs[context]
        assert dataset.name == f"digits-{split}"
        assert dataset.digest == sha[:32]
        assert json.loads(dataset.source)["uri"] == str(digits_shards)
        profile = json.loads(dataset.profile)
        assert profile["num_samples"] == index.splits[split].num_samples
        assert profile["image_shape_hwc"] == [8, 8, 1] and profile["shard_index_sha256"] == sha
    tags = found.data.tags
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.user"]
    assert tags["mlflow.source.name"]  # this process's argv[0], as MLflow's own start_run records it
    assert tags["mlflow.source.git.commit"] == head_commit()
    assert tags["prefect.flow_run.id"] == "abc"
    assert found.data.params == {k: v[:6000] for k, v in flatten(cfg).items()}  # one log_batch, MLflow splits it


def test_a_run_without_shards_still_starts(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(PRESET, ["--ingest.shard_dir", str(tmp_path / "none"), "--tracking.tracking_uri", uri])
    run_id = create_run(cfg)
    assert mlflow.MlflowClient(uri).get_run(run_id).inputs.dataset_inputs == []


def test_the_entry_point_logs_system_metrics_and_a_described_linked_model(tmp_path, digits_shards, mlflow_uri):
    argv, env = accelerate_command(PRESET, 1, overrides=[
        "--ingest.shard_dir", str(digits_shards), "--train.output_dir", str(tmp_path / "run"),
        "--train.epochs", "1", "--loss.eval_iwae_k", "2", "--tracking.model_name", "vae-provenance-test"])
    env["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "0.5"  # MLflow's own setting: several samples in a short run
    result = run(argv, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = mlflow.MlflowClient(mlflow_uri)
    version = client.get_model_version_by_alias("vae-provenance-test", "champion")
    found = client.get_run(version.run_id)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(found.data.metrics)
    assert found.data.tags["mlflow.source.name"].endswith("train.py")  # vae/train.py, what accelerate launched
    assert len(found.inputs.dataset_inputs) == 2
    model = client.get_logged_model(version.source.removeprefix("models:/"))  # the version of a logged model
    linked = {m.key: m for m in model.metrics}
    assert {"val/nll_iwae", "val/elbo", "val/bpd"} <= set(linked)
    assert found.data.metrics["val/elbo"] in {m.value for m in model.metrics if m.key == "val/elbo"}
    assert linked["val/nll_iwae"].step == linked["val/elbo"].step == max(  # the final evaluation's step
        m.step for m in client.get_metric_history(version.run_id, "train/loss"))
    assert model.tags["mlflow.source.name"] == found.data.tags["mlflow.source.name"]
    # the run's own history gains no point from the link
    assert len(client.get_metric_history(version.run_id, "val/nll_iwae")) == 1
    description = version.description
    assert description.startswith("conv VAE, latent dim 2, input 1x8x8")
    assert f"{found.data.metrics['val/nll_iwae']:.4f}" in description and "digits shards at" in description
