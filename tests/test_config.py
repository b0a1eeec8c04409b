"""The config tree: presets, overrides, and clear errors for bad values."""

import pytest
from conftest import BIN, REPO, run

from vae.config import ConfigError, load_config


def test_preset_and_overrides():
    cfg = load_config(REPO / "infra/configs/digits.yaml", ["--train.epochs", "3", "--model.arch=mlp"])
    assert (cfg.train.epochs, cfg.model.arch, cfg.source.name) == (3, "mlp", "digits")
    assert cfg.model_name == "vae-digits"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--train.mixed_precision", "fp8"], r"train.mixed_precision: Input should be 'auto', 'no', 'bf16' or 'fp16'"),
        (["--model.arch", "transformer"], r"model.arch: Input should be 'conv', 'hvae', 'mlp' or 'resnet'"),
        (["--train.batch_size", "0"], r"train.batch_size: Input should be greater than 0"),
        (["--train.epoch", "3"], r"unknown config field --train.epoch: valid here are epochs, batch_size"),
        (["--source.name", "nope"], r"unknown source 'nope'; valid sources: arrays, cifar, digits, hf, idx, "
                                    r"imagefolder, shapes, torchvision"),
        (["--source.options.bogus", "1"], r"source.options.bogus: Extra inputs are not permitted"),
        (["--epochs", "3"], r"config fields are written section.field"),
    ],
)
def test_invalid_values_name_the_field_and_the_choices(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_yaml_no_is_a_string_not_false(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("train:\n  mixed_precision: no\n  resume: true\n")
    cfg = load_config(preset, ["--train.channels_last", "false"])
    assert (cfg.train.mixed_precision, cfg.train.resume, cfg.train.channels_last) == ("no", True, False)
    assert load_config(None, ["--train.mixed_precision", "no"]).train.mixed_precision == "no"


def test_missing_preset_lists_the_presets(tmp_path):
    with pytest.raises(ConfigError, match=r"does not exist \(presets in infra/configs"):
        load_config(tmp_path / "nope.yaml")


def test_train_help_lists_every_field():
    result = run([str(BIN / "python"), str(REPO / "vae/train.py"), "--help"])
    assert result.returncode == 0, result.stderr
    for field in ("--train.batch_size", "--train.mixed_precision", "--model.latent_dim", "--tracking.model_name"):
        assert field in result.stdout


def test_train_rejects_invalid_value_before_any_work(tmp_path):
    result = run([str(BIN / "python"), str(REPO / "vae/train.py"), "--train.mixed_precision", "fp8"], cwd=tmp_path)
    assert result.returncode == 2
    assert "train.mixed_precision: Input should be 'auto', 'no', 'bf16' or 'fp16'" in result.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()
