"""The model section: one typed section per architecture (a union on model.arch), its upgrade from the old flat
section, and the places that read the config tree (overrides, --help, presets, the Prefect parameter schema)."""

import inspect
import json
import warnings

import pytest
from conftest import REPO

from vae.config import (
    FLAT_MODEL_DEFAULTS,
    MODEL_SECTIONS,
    ConfigError,
    RunConfig,
    field_help,
    load_config,
    upgrade_flat_model,
    validate,
)
from vae.models import MODELS, build_model
from vae.training import checkpoint
from vae.training.trained import model_options

PRESETS = sorted((REPO / "infra/configs").glob("*.yaml"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--model.arch", "mlp", "--model.width", "64"],
         r"model.arch 'mlp' takes only arch, latent_dim, hidden_dim, hidden_layers: remove model.width "
         r"\(model.width is taken by hvae, resnet\)"),
        (["--model.width", "64", "--model.arch", "mlp"], r"model.arch 'mlp' takes only arch, latent_dim, hidden_dim"),
        (["--model.width", "64"], r"model.arch 'conv' takes only arch, latent_dim: remove model.width"),
        (["--model.arch", "resnet", "--model.groups", "3", "--model.hidden_dim", "8"],
         r"model.arch 'resnet' takes only arch, latent_dim, width, depth, blocks: remove model.groups, "
         r"model.hidden_dim \(model.groups is taken by hvae; model.hidden_dim is taken by mlp\)"),
        (["--model.arch", "resnet", "--model.width", "0"], r"model.width: Input should be greater than 0 \(got 0\)"),
        (["--model.hiden_dim", "8"], r"unknown config field --model.hiden_dim: valid here are arch, latent_dim, "),
    ],
)
def test_a_field_the_architecture_does_not_take_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_a_preset_field_for_another_architecture_is_refused():
    with pytest.raises(ConfigError, match=r"model.arch 'resnet' takes only .*: remove model.hidden_dim, "
                                          r"model.hidden_layers"):
        load_config(REPO / "infra/configs/mnist-mlp.yaml", ["--model.arch", "resnet"])


def test_the_architecture_takes_its_own_fields_in_any_order():
    for overrides in (["--model.arch", "resnet", "--model.width", "64"], ["--model.width=64", "--model.arch=resnet"]):
        model = load_config(None, overrides).model
        assert (model.arch, model.width, model.depth) == ("resnet", 64, 2)
    assert load_config(None, ["--model.latent_dim", "4"]).model.model_dump() == {"arch": "conv", "latent_dim": 4}


def test_every_architecture_has_a_section_that_its_constructor_takes():
    assert set(MODEL_SECTIONS) == set(MODELS)
    for arch, section in MODEL_SECTIONS.items():
        accepted = inspect.signature(MODELS[arch]).parameters
        assert set(section.model_fields) - {"arch"} <= set(accepted), arch
        # the trainer passes the section whole: every field reaches the constructor (none silently dropped)
        small = {"hvae": {"width": 8}, "resnet": {"width": 8}, "mlp": {"hidden_dim": 16},
                 "aekl": {"channels": [8, 8, 8], "norm_groups": 4, "layers_per_block": 1}}.get(arch, {})
        cfg = validate({"model": {"arch": arch, **small}})
        assert set(model_options(cfg)) == set(section.model_fields) - {"arch", "latent_dim"} | {
            "likelihood", "mixtures", "gaussian_std"}
        model = build_model(arch, (1, 8, 8), cfg.model.latent_dim, **model_options(cfg))
        assert model.latent_size > 0


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_loads_with_its_model_fields(preset):
    from vae.config.yaml_input import load_yaml

    written = load_yaml(preset.read_text(), str(preset)).get("model", {})
    model = load_config(preset).model.model_dump()
    assert {k: model[k] for k in written} == written


def test_help_lists_each_architectures_fields():
    text = field_help()
    for arch, section in MODEL_SECTIONS.items():
        block = text.split(f"  model.arch {arch}: ")[1].split("\n  model.arch ")[0].split("\nloss:")[0]
        listed = [line.split()[0] for line in block.splitlines()[1:]]
        assert listed == [f"--model.{name}" for name in section.model_fields if name != "arch"], arch
    assert "--model.arch (aekl | conv | hvae | mlp | resnet, default 'conv')" in text


OLD_FLAT = {"arch": "conv", **FLAT_MODEL_DEFAULTS}  # the model section every config saved before the union holds


@pytest.mark.parametrize("arch", sorted(MODEL_SECTIONS))
def test_old_flat_model_section_upgrades_to_its_architecture(arch):
    old = {**OLD_FLAT, "arch": arch, "latent_dim": 8}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # defaulted fields the arch never took go without a word
        new = upgrade_flat_model(old)
    assert new == {k: v for k, v in old.items() if k in MODEL_SECTIONS[arch].model_fields}
    assert validate({"model": old}).model.model_dump() == validate({"model": new}).model.model_dump()


def test_old_flat_section_with_a_value_the_arch_ignored_warns_and_drops_it():
    old = {**OLD_FLAT, "arch": "mlp", "hidden_dim": 64, "width": 128}  # the old trainer built an MLP, ignoring width
    with pytest.warns(UserWarning, match=r"model.arch 'mlp' never took \{'width': 128\}"):
        model = validate({"model": old}).model
    assert model.model_dump() == {"arch": "mlp", "latent_dim": 2, "hidden_dim": 64, "hidden_layers": 1}


def test_a_checkpoint_saved_with_the_old_flat_section_still_loads(tmp_path):
    """meta.json and config.yaml of a run from before the union: resuming reads both."""
    saved = RunConfig().model_dump(mode="json")
    saved["model"] = {**OLD_FLAT, "arch": "resnet", "width": 16}
    step = tmp_path / "checkpoints" / "step-000000010"
    step.mkdir(parents=True)
    checkpoint.write_meta(step, {"epoch": 1, "step": 10, "config": saved})
    cfg = validate(checkpoint.read_meta(step)["config"])
    assert cfg.model.model_dump() == {"arch": "resnet", "latent_dim": 2, "width": 16, "depth": 2, "blocks": 1}
    import yaml

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    assert load_config(tmp_path / "config.yaml", ["--train.resume", "true"]).model == cfg.model


def test_a_hand_written_section_is_not_upgraded():
    """Only the exact old layout (every field) is upgraded; a partial section with a stray field is refused."""
    with pytest.raises(ConfigError, match=r"model.arch 'mlp' takes only"):
        validate({"model": {"arch": "mlp", "hidden_dim": 64, "width": 128}})


def test_json_schema_and_prefect_deployment_parameters():
    """The flow's parameter schema (what `to_deployment` sends, and the server checks runs against) builds, and
    the flow validates parameters into the right section."""
    from prefect.exceptions import ParameterTypeError
    from prefect.utilities.schema_tools.validation import validate as validate_schema

    from flows.ingest_dataset import DEMO
    from flows.train_vae import train_vae

    assert "oneOf" in json.dumps(RunConfig.model_json_schema()["properties"]["model"])
    schema = train_vae.parameters.model_dump(exclude_unset=True)
    default = schema["properties"]["config"]["default"]
    assert default["model"] == {"arch": "conv", "latent_dim": 2}
    for good in ({}, {"config": default}, {"config": {"model": {"latent_dim": 4}}},
                 {"config": {"model": {"arch": "resnet", "width": 64}}},
                 {"config": {"model": {"arch": "aekl", "channels": [8, 16, 16], "norm_groups": 4},
                             "loss": {"likelihood": "gaussian", "aekl": {"kl_weight": 1e-5, "disc_weight": 0.5}}}}):
        assert validate_schema(good, schema) == [], good
    bad = {"config": {"model": {"arch": "mlp", "width": 64}}}
    assert validate_schema(bad, schema)

    config = train_vae.validate_parameters({"config": {"model": {"arch": "resnet", "width": 64}}})["config"]
    assert (config.model.arch, config.model.width) == ("resnet", 64)
    assert train_vae.validate_parameters({"config": default})["config"] == DEMO  # the demo's preset
    with pytest.raises(ParameterTypeError, match=r"model.arch 'mlp' takes only arch, latent_dim, hidden_dim"):
        train_vae.validate_parameters(bad)


def test_overrides_change_single_fields_of_the_deployment_config():
    from flows.ingest_dataset import DEMO
    from vae.config import ConfigError, with_overrides

    config = with_overrides(DEMO, ["--train.epochs", "5", "--model.latent_dim", "4"])
    assert (config.train.epochs, config.model.latent_dim) == (5, 4)
    # every other field stays the demo's, unlike a partial `config` parameter, which Prefect does not merge
    assert config.model_copy(update={"train": DEMO.train, "model": DEMO.model}) == DEMO
    assert (config.train.batch_size, config.tracking.experiment) == (64, "vaepipe-digits")
    with pytest.raises(ConfigError, match="train.epochs"):
        with_overrides(DEMO, ["--train.epochs", "0"])
