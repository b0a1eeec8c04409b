"""The provenance a registered version carries (vae/training/finalize.py): shard index hash, code commit, config
hash."""

from __future__ import annotations

import hashlib
import subprocess

import pytest
from conftest import REPO, write_numbered_shards

from pipeline import index_sha256
from vae.config import config_sha256, validate
from vae.tracking.provenance import git_commit
from vae.training.finalize import version_tags


def test_index_sha256_is_the_hash_of_the_index_file(tmp_path):
    shards = write_numbered_shards(tmp_path / "shards", [5, 3])
    expected = hashlib.sha256((shards / "index.json").read_bytes()).hexdigest()
    assert index_sha256(shards) == expected
    assert index_sha256(f"file://{shards}") == expected  # fsspec URLs as the ingest writes them
    with pytest.raises(FileNotFoundError):
        index_sha256(tmp_path / "nowhere")


def test_git_commit_of_this_checkout_and_unknown_elsewhere(tmp_path, monkeypatch):
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("this copy of vaepipe is not a git checkout")
    assert git_commit() == head.stdout.strip()
    assert git_commit(tmp_path) == "unknown"  # no checkout at all
    assert git_commit(REPO / "vae") == "unknown"  # inside a checkout, but not its root: not our commit
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable
    assert git_commit() == "unknown"


def test_config_sha256_is_stable_and_follows_every_field():
    base = config_sha256(validate({}))
    assert base == config_sha256(validate({})) and len(base) == 64
    assert config_sha256(validate({"train": {"epochs": 3}})) != base
    assert config_sha256(validate({"train": {"seed": 1}, "model": {"latent_dim": 4}})) == config_sha256(
        validate({"model": {"latent_dim": 4}, "train": {"seed": 1}}))  # key order does not matter


def test_version_tags_hold_provenance_and_headline_metrics(tmp_path):
    shards = write_numbered_shards(tmp_path / "shards", [4])
    cfg = validate({"ingest": {"shard_dir": str(shards)}})
    tags = version_tags(cfg, {"val/elbo": -90.25, "val/nll_iwae": 88.5, "val/bpd": 1.5})
    assert tags == {"val_elbo": "-90.25", "val_bpd": "1.5", "shard_index_sha256": index_sha256(shards),
                    "git_commit": git_commit(), "config_sha256": config_sha256(cfg)}
