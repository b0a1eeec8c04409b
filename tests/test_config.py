"""The config tree: presets, overrides, and clear errors for bad values (YAML included)."""

import pytest
from conftest import BIN, REPO, run

from vae.config import ConfigError, load_config
from vae.config.yaml_input import MAX_YAML_VALUES


def test_preset_and_overrides():
    cfg = load_config(REPO / "infra/configs/digits.yaml", ["--train.epochs", "3", "--model.arch=mlp"])
    assert (cfg.train.epochs, cfg.model.arch, cfg.source.name) == (3, "mlp", "digits")
    assert cfg.model_name == "vae-digits"


def test_aekl_registers_under_its_own_default_name():
    """aekl competes on PSNR: under the ELBO family's default name its registration would be refused."""
    cfg = load_config(REPO / "infra/configs/digits.yaml", ["--model.arch", "aekl", "--loss.likelihood", "gaussian"])
    assert cfg.model_name == "aekl-digits"
    named = load_config(REPO / "infra/configs/digits.yaml", ["--model.arch", "aekl", "--loss.likelihood",
                                                             "gaussian", "--tracking.model_name", "mine"])
    assert named.model_name == "mine"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--train.mixed_precision", "fp8"], r"train.mixed_precision: Input should be 'auto', 'no', 'bf16' or 'fp16'"),
        (["--model.arch", "transformer"], r"model.arch: Input should be 'aekl', 'conv', 'hvae', 'mlp', 'resnet' "
                                          r"\(got 'transformer'\)"),
        (["--train.batch_size", "0"], r"train.batch_size: Input should be greater than 0"),
        (["--train.epoch", "3"], r"unknown config field --train.epoch: valid here are epochs, batch_size"),
        (["--source.name", "nope"], r"unknown source 'nope'; valid sources: arrays, cifar, digits, hf, idx, "
                                    r"imagefolder, shapes, torchvision"),
        (["--source.options.bogus", "1"], r"source.options.bogus: Extra inputs are not permitted"),
        (["--epochs", "3"], r"config fields are written section.field"),
        # numpy seeds are 0 .. 2**32 - 1; these used to pass and fail later in set_seed
        (["--train.seed", "-1"], r"train.seed: Input should be greater than or equal to 0 \(got -1\)"),
        (["--train.seed", str(2**32)], r"train.seed: Input should be less than or equal to 4294967295"),
        # inf and nan were accepted by every float field and by the free-form option mappings
        (["--optim.lr", "inf"], r"optim.lr: Input should be a finite number \(got 'inf'\)"),
        (["--optim.lr", ".inf"], r"optim.lr: Input should be a finite number \(got inf\)"),
        (["--loss.beta", ".nan"], r"loss.beta: Input should be a finite number \(got nan\)"),
        (["--loss.gaussian_std", ".inf"], r"loss.gaussian_std: Input should be a finite number"),
        (["--ingest.retry_delay_s", ".inf"], r"ingest.retry_delay_s: Input should be a finite number"),
        (["--train.ema_decay", ".nan"], r"train.ema_decay: Input should be a finite number"),
        (["--ingest.storage_options", "{client_kwargs: {timeouts: [1, .inf]}}"],
         r"ingest.storage_options.client_kwargs.timeouts\[1\] must be a finite number, got inf"),
        (["--source.options.test_fraction", ".nan"], r"source.options.test_fraction must be a finite number, got nan"),
        # an override that is not YAML: a ConfigError naming the override, not a parser traceback
        (["--train.epochs", "[3"], r"--train.epochs: invalid YAML at line 1, column 3: .*expected ',' or ']'"),
        (["--train.epochs", "!!python/object/apply:os.getpid []"],
         r"--train.epochs: invalid YAML at line 1, column 1: could not determine a constructor for the tag "
         r"'tag:yaml.org,2002:python/object/apply:os.getpid' \(configs are plain YAML"),
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


def test_seed_range_is_numpys():
    from accelerate.utils import set_seed

    cfg = load_config(None, ["--train.seed", str(2**32 - 1)])
    set_seed(cfg.train.seed)  # the largest seed the config takes is one numpy takes
    assert load_config(None, ["--train.seed", "0"]).train.seed == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train:\n  epochs: 3\n   seed: 1\n", r"p.yaml: invalid YAML at line 3, column 8: mapping values are not"),
        ("train: {epochs: 3\n", r"p.yaml: invalid YAML at line 2, column 1: .*expected ',' or '}'"),
        ("train:\n  epochs: 3\n  seed: !!python/object/apply:os.system [\"touch PWNED\"]\n",
         r"p.yaml: invalid YAML at line 3, column 9: could not determine a constructor for the tag "
         r"'tag:yaml.org,2002:python/object/apply:os.system' \(configs are plain YAML: .*no tags\)"),
        ("train:\n  output_dir: !path runs/x\n", r"p.yaml: invalid YAML at line 2, column 15: .*tag '!path'"),
        ("train: {}\n---\nmodel: {}\n", r"p.yaml: invalid YAML at line 2, column 1: expected a single document"),
        ("a: &a [*a]\n", r"p.yaml: line 1 \(a\[0\]\): an alias refers to a collection that contains it"),
    ],
)
def test_yaml_errors_name_the_file_and_line(tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)
    preset = tmp_path / "p.yaml"
    preset.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(preset)
    assert not (tmp_path / "PWNED").exists()


def alias_bomb(levels: int) -> list[str]:
    """`name: value` entries, each level listing the previous one 9 times: 9**levels values in a few hundred bytes."""
    entries = ["l0: &l0 [" + ",".join(["lol"] * 9) + "]"]
    return entries + [f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]


def test_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    preset = tmp_path / "bomb.yaml"
    preset.write_text("ingest:\n  storage_options:\n" + "".join(f"    {e}\n" for e in alias_bomb(8)))
    assert len(preset.read_bytes()) < 500  # 9**8 = 43 million strings: the old loader took them all
    with pytest.raises(ConfigError, match=rf"bomb.yaml: line 7 \(ingest.storage_options.l4\): expands to more than "
                                          rf"{MAX_YAML_VALUES:,} values \(aliases such as \*name repeat"):
        load_config(preset)
    with pytest.raises(ConfigError, match=r"--ingest.storage_options: line 1 \(l4\): expands to more than"):
        load_config(None, ["--ingest.storage_options", "{" + ", ".join(alias_bomb(8)) + "}"])


def test_yaml_aliases_within_the_bound_still_load(tmp_path):
    preset = tmp_path / "ok.yaml"
    preset.write_text("ingest:\n  storage_options:\n" + "".join(f"    {e}\n" for e in alias_bomb(3)))  # ~900 values
    options = load_config(preset).ingest.storage_options
    assert len(options["l2"]) == 9 and options["l2"][0] == options["l1"] and options["l1"][0] == ["lol"] * 9


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
