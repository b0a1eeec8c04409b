"""prefect.yaml, Prefect 3's own deployment path: `prefect deploy --all` to a real server on loopback gives both
deployments with the one-training-run limit and the demo's defaults, and a process worker runs one."""

import os

import pytest
from conftest import BIN, REPO, run
from support.servers import PrefectServer

import pipeline

pytestmark = [pytest.mark.server, pytest.mark.slow]
POOL = "vaepipe"  # the work pool prefect.yaml names


@pytest.fixture
def prefect_server(tmp_path):
    """A Prefect server of its own (a fresh database: the deployments below are the only ones) and its clients' env."""
    with PrefectServer(tmp_path / "server") as server:
        env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"),
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_API_URL": server.api}
        env.pop("MLFLOW_RUN_ID", None)
        yield env


def client_for(env):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
        return get_client(sync_client=True)


def test_prefect_deploy_all_gives_the_limit_and_defaults_and_a_worker_runs_it(prefect_server, tmp_path):
    env = prefect_server
    made = run([str(BIN / "prefect"), "work-pool", "create", POOL, "--type", "process"], env=env)
    assert made.returncode == 0, made.stdout + made.stderr
    deployed = run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], env=env, cwd=REPO)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    with client_for(env) as client:
        train = client.read_deployment_by_name("train-vae/train-vae")
        ingest = client.read_deployment_by_name("ingest-dataset/ingest-dataset")
        assert train.work_pool_name == ingest.work_pool_name == POOL
        # the limit `vaepipe serve` gives: one training run at a time, later ones queued
        assert train.global_concurrency_limit.limit == 1
        assert train.concurrency_options.collision_strategy.value == "ENQUEUE"
        assert ingest.global_concurrency_limit is None
        # default parameters: the demo's model (infra/configs/digits.yaml), not the built-in defaults
        default = train.parameter_openapi_schema["properties"]["config"]["default"]
        assert (default["train"]["epochs"], default["train"]["batch_size"]) == (30, 64)
        assert default["tracking"]["experiment"] == "vaepipe-digits"
        out = tmp_path / "shards"
        flow_run = client.create_flow_run_from_deployment(
            ingest.id, parameters={"ingest": {"shard_dir": str(out), "samples_per_shard": 512, "block_size": 128}})
    worker = run([str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--run-once", "--type", "process"],
                 env=env, cwd=tmp_path, timeout=600)
    assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]
    with client_for(env) as client:
        state = client.read_flow_run(flow_run.id).state
    assert state.is_completed(), f"{state}\n{worker.stdout[-3000:]}{worker.stderr[-3000:]}"
    assert pipeline.read_index(out).source["name"] == "digits"  # the flow ran, from the checkout prefect.yaml names
