"""The registry compares a challenger with the champion only under one evaluation protocol (issue 25 item 2): the
version is always registered, the champion stays when the protocols differ, and the tag names the fields."""

from __future__ import annotations

import uuid

import mlflow
import pytest
import torch

from vae.models.spec import build_from_spec, model_spec
from vae.objectives import PSNR
from vae.objectives.aekl.protocol import DIGEST_TAG, PROTOCOL_TAG, EvaluationProtocol, differences
from vae.registry.packaging import log_model
from vae.registry.versions import NOT_COMPARED_TAG, register_version
from vae.tracking.store import ensure_experiment

SPEC = model_spec("conv", (1, 8, 8), 2)
BASE = EvaluationProtocol(split="test", count=100, resolution=(8, 8), channels=1, ingest_transform="as ingested",
                          crop="none: whole image", posterior="mode", seed=None, lpips="absent: no weights",
                          fid="absent: no weights", shard_index_sha256="ab" * 32)


def aliases(name: str) -> dict[str, int]:
    return {k: int(v) for k, v in mlflow.MlflowClient().get_registered_model(name).aliases.items()}


def tags(protocol: EvaluationProtocol) -> dict[str, str]:
    return {DIGEST_TAG: protocol.digest(), PROTOCOL_TAG: protocol.canonical()}


@pytest.fixture
def logged(tracking_uri, monkeypatch):
    """A tiny model logged into a fresh run of the session's sqlite store: (run_id, model_uri)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    torch.manual_seed(0)
    run = mlflow.MlflowClient().create_run(ensure_experiment("registry-protocol-tests", tracking_uri))
    return run.info.run_id, log_model(build_from_spec(SPEC).eval(), SPEC, run.info.run_id)


def test_the_digest_is_stable_and_names_every_field_that_differs():
    other = BASE.model_copy(update={"count": 50, "posterior": "sample", "seed": 0})
    assert BASE.digest() == EvaluationProtocol.model_validate_json(BASE.model_dump_json()).digest()
    assert BASE.digest() != other.digest()
    assert differences(BASE.model_dump(mode="json"), other.model_dump(mode="json")) == ["count", "posterior", "seed"]


def test_a_better_challenger_under_the_same_protocol_takes_the_champion(logged):
    run_id, uri = logged
    name = f"aekl-test-{uuid.uuid4().hex[:8]}"
    register_version(uri, name, 20.0, run_id, tags=tags(BASE), criterion=PSNR)
    better = register_version(uri, name, 21.0, run_id, tags=tags(BASE), criterion=PSNR)
    assert better.champion and better.not_compared is None
    assert NOT_COMPARED_TAG not in mlflow.MlflowClient().get_model_version(name, "2").tags


def test_a_challenger_under_another_protocol_is_registered_but_never_compared(logged):
    run_id, uri = logged
    name = f"aekl-test-{uuid.uuid4().hex[:8]}"
    client = mlflow.MlflowClient()
    register_version(uri, name, 20.0, run_id, tags=tags(BASE), criterion=PSNR)
    fewer = BASE.model_copy(update={"count": 10, "lpips": "alex: lpips 0.1.4"})
    with pytest.warns(UserWarning, match="fields that differ: count, lpips"):
        other = register_version(uri, name, 35.0, run_id, tags=tags(fewer), criterion=PSNR)  # far better, elsewhere
    assert other.version == 2 and not other.champion
    assert aliases(name) == {"champion": 1, "challenger": 2}
    assert "fields that differ: count, lpips" in client.get_model_version(name, "2").tags[NOT_COMPARED_TAG]
    # a later version under the champion's protocol still competes with it, and not with version 2
    third = register_version(uri, name, 22.0, run_id, tags=tags(BASE), criterion=PSNR)
    assert third.champion and third.not_compared is None
    assert aliases(name) == {"champion": 3, "challenger": 3}


def test_a_champion_from_before_protocols_stays_and_the_message_says_how_to_compare(logged):
    """Its PSNR was measured another way (floats, another LPIPS), so a protocol-scored version does not replace it
    by number; the message names the command that scores both under one protocol."""
    run_id, uri = logged
    name = f"aekl-test-{uuid.uuid4().hex[:8]}"
    client = mlflow.MlflowClient()
    register_version(uri, name, 20.0, run_id, criterion=PSNR)  # no protocol tags: registered before them
    with pytest.warns(UserWarning, match="before evaluation protocols were recorded"):
        new = register_version(uri, name, 30.0, run_id, tags=tags(BASE), criterion=PSNR)
    assert not new.champion and aliases(name)["champion"] == 1
    assert f"vaepipe evaluate models:/{name}/1" in new.not_compared
    assert client.get_model_version(name, "2").tags[NOT_COMPARED_TAG] == new.not_compared
