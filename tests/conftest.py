"""Shared fixtures: tiny shard directories, and real MLflow and Prefect servers on loopback (tests/support)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support.servers import (  # noqa: F401 - free_port, mlflow_server_env, stop, wait_http: the modules import them here
    MlflowServer,
    PrefectServer,
    free_port,
    mlflow_server_env,
    stop,
    wait_http,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
BIN = Path(sys.executable).parent


def shared_dataset(name: str) -> Path:
    """../shared/data/<name>, or skip the test saying so: the project itself never requires these files."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real data not found at {path} (../shared/data is absent on this machine)")
    return path


@contextlib.contextmanager
def isolated_prefect(home: Path):
    """Prefect settings pointing at `home` for this process (settings are read at import, so the environment
    alone is not enough) and for its children, with no API URL inherited from the shell and no telemetry."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_HOME", str(home))
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        mp.delenv("PREFECT_API_URL", raising=False)
        with temporary_settings(
            updates={PREFECT_HOME: home, PREFECT_SERVER_ANALYTICS_ENABLED: False}, restore_defaults={PREFECT_API_URL}
        ):
            yield home


@pytest.fixture(scope="session")
def prefect_home(tmp_path_factory):
    """An isolated Prefect home for this session's process and its children, with no API URL from the shell."""
    with isolated_prefect(tmp_path_factory.mktemp("prefect-home")) as home:
        yield home


@pytest.fixture(scope="session")
def prefect_api(prefect_home, tmp_path_factory) -> str:
    """A Prefect server for flows run in this process (its API URL set in this process's settings, not in the
    environment of children); on exit the queued logs and events are sent before it stops.

    One per session: each start costs 12-32 s on a busy 2-core machine."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with PrefectServer(tmp_path_factory.mktemp("prefect-server")) as server:
        with temporary_settings(updates={PREFECT_API_URL: server.api}):
            yield server.api
            APILogWorker.drain_all(timeout=30)
            EventsWorker.drain_all(timeout=30)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """A real MLflow tracking server (sqlite backend, local artifacts) on 127.0.0.1; returns its URI."""
    with MlflowServer(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server.uri


@pytest.fixture
def mlflow_uri(mlflow_server, monkeypatch) -> str:
    """Point this test's MLflow client (and any child process) at the loopback server."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(mlflow_server)
    return mlflow_server


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory) -> str:
    """An embedded sqlite MLflow store for the in-process runs (tests/support/training.py): no server to start on a
    loaded machine, and one store for the session, as creating one runs MLflow's schema migrations (seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def s3_server(monkeypatch):
    """A local S3-compatible server (moto) on 127.0.0.1 with an empty bucket; yields its endpoint URL."""
    pytest.importorskip("s3fs", reason="S3 destinations need the s3 extra (pip install '.[s3]')")
    server_module = pytest.importorskip("moto.server", reason="the S3 test needs moto[server] (test extra)")
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    port = free_port()
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        import boto3

        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="shards")
        yield endpoint
    finally:
        server.stop()


@pytest.fixture(scope="session")
def registered(mlflow_server) -> tuple[str, dict]:
    """A model with two versions on the session's MLflow server, 1 the champion and 2 the challenger
    (support/registry.py): (its name, the module of each version). The tests only read it."""
    import mlflow
    from support.registry import register_two_versions

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        mlflow.set_tracking_uri(mlflow_server)
        try:
            return register_two_versions(mlflow_server)
        finally:
            mlflow.set_tracking_uri(None)  # back to the environment's, which the context restores


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    """The offline default source ingested once per session (small shards, so there are several)."""
    from pipeline import ingest

    out = tmp_path_factory.mktemp("shards") / "digits"
    ingest("digits", {}, out, samples_per_shard=512, block_size=128, progress=False)
    return out


def write_numbered_shards(out: Path, counts: list[int], block_size: int = 4, shape=(4, 4, 1)) -> Path:
    """A split 'train' whose shards hold `counts` samples; sample i has label i, so tests can trace it."""
    from pipeline.records import Record
    from pipeline.shards import ShardIndex, write_index, write_split

    out.mkdir(parents=True, exist_ok=True)
    infos = []
    start = 0
    for n in counts:  # one write per shard gives exactly the uneven sizes asked for
        (out / "tmp").mkdir(exist_ok=True)
        records = [Record(f"s{i}", np.full(shape, i % 256, np.uint8), label=i) for i in range(start, start + n)]
        start += n
        info, _ = write_split(records, out / "tmp", "train", samples_per_shard=4096 * block_size, block_size=block_size)
        (out / "tmp" / info.shards[0].name).rename(out / f"train-{len(infos):06d}.tar")
        infos.append(info.shards[0].model_copy(update={"name": f"train-{len(infos):06d}.tar"}))
    (out / "tmp").rmdir()
    from pipeline.shards import SplitInfo

    split = SplitInfo(num_samples=start, shards=infos, num_classes=start)
    write_index(out, ShardIndex(source={"name": "test", "config": {}}, block_size=block_size,
                                image_shape=shape, splits={"train": split}))
    return out


def run(cmd: list[str], env: dict | None = None, timeout: float = 600, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run a command, returning its result; the output is kept for the assertion message."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(cmd, env=full_env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
