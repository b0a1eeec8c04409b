"""train.cuda_graphs: CUDA graph capture of the compiled step on a GPU, refused clearly everywhere else; the CPU
path is the plain compiled one."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from vae.config import ConfigError, RunConfig, load_config
from vae.training import checkpoint
from vae.training.graphs import compile_options

PRESET = REPO / "infra/configs/digits.yaml"


def test_graphs_compile_in_reduce_overhead_mode_on_a_gpu_only():
    assert compile_options(False, "cpu") == {} and compile_options(False, "cuda:0") == {}
    assert compile_options(True, torch.device("cuda", 0)) == {"mode": "reduce-overhead"}
    with pytest.raises(ValueError, match="trains on 'cpu': set --train.cuda_graphs false"):
        compile_options(True, "cpu")


def test_the_config_refuses_graphs_without_compile():
    with pytest.raises(ConfigError, match="train.cuda_graphs replays the compiled step: set train.compile true"):
        load_config(PRESET, ["--train.cuda_graphs", "true"])
    assert load_config(PRESET, ["--train.cuda_graphs", "true", "--train.compile", "true"]).train.cuda_graphs
    assert not RunConfig.model_fields["train"].default_factory().cuda_graphs  # off unless asked


def test_a_checkpoint_from_before_the_flag_still_resumes():
    """Graphs replay the same computation: turning them on or off, or a config without the field, is no change."""
    now = load_config(PRESET, []).model_dump(mode="json")
    before = {**now, "train": {k: v for k, v in now["train"].items() if k != "cuda_graphs"}}
    assert checkpoint.config_changes(before, now) == []
    graphs = {**now, "train": {**now["train"], "cuda_graphs": True, "compile": True}}
    assert checkpoint.config_changes(now, graphs) == ["train.compile: False -> True"]


def test_the_trainer_on_a_cpu_refuses_graphs_before_training(tmp_path, digits_shards):
    """A CPU run (CUDA hidden) stops with the fix before it trains or writes a checkpoint."""
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(REPO / "vae/train.py"), "--config", str(PRESET), "--ingest.shard_dir", str(digits_shards),
         "--train.output_dir", str(out), "--tracking.finalize", "false", "--train.compile", "true",
         "--train.cuda_graphs", "true", "--tracking.tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "error: train.cuda_graphs captures CUDA kernels, but this run trains on 'cpu'" in result.stderr
    assert not (out / "checkpoints").exists()
