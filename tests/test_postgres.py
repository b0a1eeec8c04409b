"""vaepipe against a real PostgreSQL: MLflow and Prefect servers on postgres backends (as in infra/compose.yaml).

The session fixture starts PostgreSQL from the Debian package's binaries (tests/postgres.py) and skips, saying
how to install it, where they are missing.
"""

from __future__ import annotations

import uuid

import mlflow
import numpy as np
import pytest
import sqlalchemy
import torch
from conftest import BIN, free_port, run
from postgres import create_database, postgres_server
from support.servers import MlflowServer, PrefectServer

from vae.config import RunConfig
from vae.models.spec import build_from_spec, model_spec
from vae.registry.packaging import load_torch_model, log_model
from vae.registry.versions import register_version
from vae.tracking.store import create_run, log_metrics

pytestmark = pytest.mark.server


@pytest.fixture(scope="session")
def postgres_base_url() -> str:
    """A PostgreSQL server on a free loopback port for the session: `postgresql://postgres@127.0.0.1:<port>`."""
    with postgres_server(free_port()) as url:
        yield url


@pytest.fixture(scope="session")
def mlflow_db_url(postgres_base_url) -> str:
    """A fresh database for MLflow's backend store, as a SQLAlchemy URL (`postgresql://`: psycopg 3 under
    SQLAlchemy 2.1, for this process and for the MLflow server alike)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.fail("SQLAlchemy 2.1 opens postgresql:// URLs with psycopg 3, which is not installed: "
                    "pip install 'psycopg[binary]' (a dependency in pyproject.toml)")
    return create_database(postgres_base_url, "mlflow")


@pytest.fixture(scope="session")
def mlflow_on_postgres(mlflow_db_url, tmp_path_factory) -> str:
    """`mlflow server` with `--backend-store-uri postgresql://...` on 127.0.0.1; its URL."""
    with MlflowServer(tmp_path_factory.mktemp("mlflow-pg"), backend=mlflow_db_url) as server:
        yield server.uri


def test_fixture_serves_a_real_postgres_database(mlflow_db_url):
    engine = sqlalchemy.create_engine(mlflow_db_url)
    try:
        with engine.connect() as connection:
            assert connection.execute(sqlalchemy.text("select version()")).scalar().startswith("PostgreSQL")
            assert connection.execute(sqlalchemy.text("select current_database()")).scalar() == "mlflow"
    finally:
        engine.dispose()


def test_run_metrics_and_registered_model_round_trip_through_postgres(mlflow_on_postgres, mlflow_db_url,
                                                                     monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_on_postgres)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(mlflow_on_postgres)
    name = f"vae-pg-{uuid.uuid4().hex[:8]}"
    cfg = RunConfig()
    cfg.tracking.tracking_uri = mlflow_on_postgres
    cfg.tracking.experiment = "postgres-test"

    run_id = create_run(cfg)  # also logs the resolved config as params, in batches of 100
    metrics = {"train/loss": 101.5, "train/elbo": -101.5, "val/elbo": -98.25, "val/bpd": 0.31, "val/nll_iwae": 97.0}
    log_metrics(metrics, step=3, run_id=run_id)
    with pytest.raises(ValueError, match="fixed names"):
        log_metrics({"val/made_up": 1.0}, step=3, run_id=run_id)

    torch.manual_seed(0)
    spec = model_spec("conv", (1, 8, 8), 2)
    model = build_from_spec(spec).eval()
    uri = log_model(model, spec, run_id)
    score = metrics["val/nll_iwae"]  # the champion's criterion; passed by position, as its name is in flux
    first = register_version(uri, name, score, run_id)
    assert (first.version, first.champion) == (1, True)
    tie = register_version(log_model(model, spec, run_id), name, score, run_id)
    assert (tie.version, tie.champion) == (2, False)  # a tie keeps the earlier champion

    loaded = load_torch_model(f"models:/{name}@champion")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = np.random.default_rng(0).random((2, 1, 8, 8), dtype=np.float32)
    reconstruction = mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(x)
    assert np.asarray(reconstruction).shape == (2, 1, 8, 8)

    client = mlflow.MlflowClient(mlflow_on_postgres)
    run = client.get_run(run_id)
    assert {k: run.data.metrics[k] for k in metrics} == metrics
    assert run.data.params["train.epochs"] == str(cfg.train.epochs)
    # ... and it is PostgreSQL that holds them, not some other store behind the server
    engine = sqlalchemy.create_engine(mlflow_db_url)
    try:
        with engine.connect() as connection:
            stored = dict(connection.execute(sqlalchemy.text(
                "select key, value from latest_metrics where run_uuid = :run"), {"run": run_id}).all())
            versions = connection.execute(sqlalchemy.text(
                "select version from model_versions where name = :name order by version"), {"name": name}).scalars()
            alias = connection.execute(sqlalchemy.text(
                "select version from registered_model_aliases where name = :name and alias = 'champion'"),
                {"name": name}).scalar()
            assert stored == metrics
            assert list(versions) == [1, 2]
            assert alias == 1
    finally:
        engine.dispose()


TINY_FLOW = """
from prefect import flow

@flow(name="postgres-probe")
def probe(x: int) -> int:
    return x + 1

assert probe(41) == 42
"""


def test_prefect_server_records_flow_runs_in_postgres(postgres_base_url, tmp_path):
    """The Prefect server of infra/compose.yaml: its database on PostgreSQL through asyncpg."""
    db_url = create_database(postgres_base_url, "prefect")
    asyncpg_url = db_url.replace("postgresql://", "postgresql+asyncpg://")
    with PrefectServer(tmp_path / "server", database=asyncpg_url, timeout=240) as server:
        client_env = {"PREFECT_API_URL": server.api, "PREFECT_HOME": str(tmp_path / "client")}
        result = run([str(BIN / "python"), "-c", TINY_FLOW], env=client_env, timeout=300, cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
    engine = sqlalchemy.create_engine(db_url)
    try:
        with engine.connect() as connection:
            states = connection.execute(sqlalchemy.text(
                "select r.state_type from flow_run r join flow f on f.id = r.flow_id where f.name = 'postgres-probe'"
            )).scalars().all()
    finally:
        engine.dispose()
    assert states == ["COMPLETED"]
