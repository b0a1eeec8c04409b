"""Registrations that finish together, against the real loopback MLflow server: whatever the interleaving,
exactly one version holds `champion`, the one with the lowest validation NLL, and `challenger` the newest."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import mlflow
import pytest
import torch

from vae.models.spec import build_from_spec, model_spec
from vae.registry.packaging import log_model
from vae.registry.versions import register_version
from vae.tracking.store import ensure_experiment

pytestmark = pytest.mark.server

WAIT = 120  # seconds; a registration takes about one


@pytest.fixture
def logged(mlflow_uri) -> tuple[str, str]:
    """A tiny model logged into a fresh run: (run_id, model_uri); every registration below reuses it."""
    torch.manual_seed(0)
    run = mlflow.MlflowClient().create_run(ensure_experiment("registry-concurrency", mlflow_uri))
    spec = model_spec("mlp", (1, 8, 8), 2, hidden_dim=8)
    return run.info.run_id, log_model(build_from_spec(spec), spec, run.info.run_id)


def holders(name: str, alias: str) -> list[int]:
    """Every version holding `alias`, read version by version (search results may leave aliases out)."""
    client = mlflow.MlflowClient()
    versions = [int(v.version) for v in client.search_model_versions(f"name='{name}'")]
    return [v for v in versions if alias in client.get_model_version(name, str(v)).aliases]


def test_a_stale_champion_write_is_corrected(logged, monkeypatch):
    """The worse registrar decides before the better version exists and writes only after the better
    registrar has finished: a read-compare-set would leave the worse version as the champion."""
    run_id, uri = logged
    name = f"vae-test-{uuid.uuid4().hex[:8]}"
    paused, resume = threading.Event(), threading.Event()
    set_alias = mlflow.MlflowClient.set_registered_model_alias

    def held_back(self, model_name, alias, version):
        if threading.current_thread().name.startswith("worse") and alias == "champion" and not paused.is_set():
            paused.set()
            if not resume.wait(WAIT):
                raise TimeoutError("the test never resumed the worse registrar")
        return set_alias(self, model_name, alias, version)

    monkeypatch.setattr(mlflow.MlflowClient, "set_registered_model_alias", held_back)
    with ThreadPoolExecutor(1, thread_name_prefix="worse") as first, \
            ThreadPoolExecutor(1, thread_name_prefix="better") as second:
        worse = first.submit(register_version, uri, name, 120.0, run_id)
        assert paused.wait(WAIT), "the worse registrar never tried to take the champion alias"
        better = second.submit(register_version, uri, name, 100.0, run_id).result(WAIT)
        assert better.version == 2 and better.champion and better.previous_champion_score is None
        resume.set()  # now the stale write lands, after the better registrar has returned
        worse = worse.result(WAIT)
    assert worse.version == 1 and not worse.champion
    assert holders(name, "champion") == [2]
    assert holders(name, "challenger") == [2]


@pytest.mark.parametrize("repetition", range(6))
def test_simultaneous_registrations_leave_one_champion_the_better(logged, repetition):
    run_id, uri = logged
    name = f"vae-test-{uuid.uuid4().hex[:8]}"
    register_version(uri, name, 150.0, run_id)  # an existing champion that both newcomers beat
    nll = {"a": 100.0, "b": 110.0} if repetition % 2 else {"a": 110.0, "b": 100.0}
    start = threading.Barrier(2)

    def registrar(who: str):
        start.wait(WAIT)  # both begin at once, each with its own client inside `register`
        return register_version(uri, name, nll[who], run_id)

    with ThreadPoolExecutor(2) as pool:
        results = {who: pool.submit(registrar, who) for who in nll}
        results = {who: future.result(WAIT) for who, future in results.items()}
    best = min(nll, key=nll.get)
    assert holders(name, "champion") == [results[best].version]
    assert holders(name, "challenger") == [3]  # the newest of versions 2 and 3
    # The worse one may report champion=True: it held the alias if it finished before the better one began.
    assert results[best].champion
