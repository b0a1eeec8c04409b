"""`vaepipe models list` and `vaepipe models pull` as subprocesses against the real loopback MLflow server,
with their error paths: each failure exits 1 with one line naming what exists instead, and writes nothing."""

from __future__ import annotations

import os
import subprocess

import mlflow
import numpy as np
import pytest
import torch
from conftest import BIN
from safetensors.torch import load_file
from support.registry import vaepipe_models

pytestmark = pytest.mark.server

def test_list_shows_versions_aliases_and_headline_tags(registered, mlflow_uri):
    name, _ = registered
    for args in (["list", "--tracking-uri", mlflow_uri], ["list"]):  # the default is MLFLOW_TRACKING_URI
        result = vaepipe_models(*args)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        start = lines.index(f"{name}  (2 versions)")
        assert [line.split() for line in lines[start + 1 : start + 3]] == [
            ["2", "challenger", "val_nll=120.0000", "val_elbo=-125.0000", "val_bpd=1.2500", "git_commit=0123456789ab"],
            ["1", "champion", "val_nll=100.0000", "val_elbo=-105.0000", "val_bpd=1.2500", "git_commit=0123456789ab"],
        ]


@pytest.mark.usefixtures("mlflow_uri")
@pytest.mark.parametrize(("ref", "version"), [("{name}", 1), ("{name}@challenger", 2), ("{name}/1", 1)])
def test_pull_downloads_the_named_version(registered, tmp_path, ref, version):
    name, modules = registered
    dest = tmp_path / "pulled" / "model"  # missing parents are created
    result = vaepipe_models("pull", ref.format(name=name), str(dest))
    assert result.returncode == 0, result.stderr
    assert f"pulled {name} version {version} into {dest}" in result.stdout
    assert {"MLmodel", "pyfunc.py", "requirements.txt"} <= {p.name for p in dest.iterdir()}
    assert (dest / "code" / "vae" / "models" / "__init__.py").is_file()
    weights = load_file(dest / "artifacts" / "weights.safetensors")
    expected = modules[version].state_dict()
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in weights)
    x = np.random.default_rng(0).random((2, 1, 8, 8), dtype=np.float32)
    with torch.no_grad():  # the directory alone is a working model, no tracking server involved
        np.testing.assert_array_equal(mlflow.pyfunc.load_model(str(dest)).predict(x, params={"mode": "encode"}),
                                      modules[version].encode(torch.from_numpy(x))[0].numpy())


@pytest.mark.usefixtures("mlflow_uri")
def test_pull_errors_name_what_exists_and_write_nothing(registered, tmp_path):
    name, _ = registered
    dest = tmp_path / "new"
    cases = {
        f"{name}@best": f"error: {name} has no alias 'best'; its aliases: challenger (version 2), champion (version 1)",
        f"{name}/9": f"error: {name} has no version 9; its versions: 1, 2",
        f"{name}-missing": f"error: no registered model '{name}-missing'; registered: ",
        f"{name}@": f"error: bad model reference '{name}@': use NAME, NAME@ALIAS or NAME/VERSION",
    }
    for ref, message in cases.items():
        result = vaepipe_models("pull", ref, str(dest))
        assert result.returncode == 1 and message in result.stderr, (ref, result.stderr)
        assert not dest.exists()

    (dest / "keep.txt").parent.mkdir()
    (dest / "keep.txt").write_text("mine")
    result = vaepipe_models("pull", name, str(dest))
    assert result.returncode == 1, result.stderr
    assert f"error: {dest} is not an empty directory; pull into a new or empty one" in result.stderr
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]


def test_a_missing_embedded_store_is_an_error_not_a_new_database(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    result = subprocess.run([str(BIN / "vaepipe"), "models", "list"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1
    assert f"error: no MLflow store at {tmp_path / 'mlflow.db'}: run from the directory holding mlflow.db" in (
        result.stderr)
    assert list(tmp_path.iterdir()) == []


def test_unknown_arguments_are_refused():
    result = vaepipe_models("list", "--bogus")
    assert result.returncode == 2 and "unrecognized arguments: --bogus" in result.stderr
