"""The command line of a run: `--section.field VALUE` overrides over an optional YAML preset, and `--help` listing
every field with its type, default and description.

Kept by hand rather than pydantic-settings' CLI source or tyro (issue 23 weighed both): a value here is a YAML
scalar (`--model.channels [64,128]`, `--train.resume true`), presets merge under the overrides, a model field is
checked against every architecture before `model.arch` is known, and every error is one `ConfigError` line naming
the field and the allowed values. pydantic-settings' source needs a `BaseSettings` root, which would also read
environment variables into the config, and parses values as JSON; tyro builds its own argparse errors.

Owns: parsing argv into a RunConfig, loading presets, the help text. Imports the schema (vae.config.run).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel

from vae.config.run import ConfigError, RunConfig, validate
from vae.config.yaml_input import YAMLInputError, load_yaml


def _fields(annotation: Any) -> dict[str, Any] | None:
    """The fields of a section annotation: a model's own, or for a union of sections (model) every member's."""
    members = get_args(annotation) or (annotation,)
    if not all(isinstance(m, type) and issubclass(m, BaseModel) for m in members):
        return None
    return {name: field for m in members for name, field in m.model_fields.items()}


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set data['a']['b']['c'] for 'a.b.c', checking each name against the config tree.

    Under model, a name is checked against every architecture's fields: the arch may come from a preset or a
    later override, and validation then refuses a field the chosen one does not take, naming its fields.
    """
    *parents, leaf = dotted.split(".")
    node, fields = data, _fields(RunConfig)
    for depth, name in enumerate(parents):
        if fields is not None:
            if name not in fields:
                raise ConfigError(f"unknown config field --{dotted}: valid here are {', '.join(fields)}")
            fields = _fields(fields[name].annotation)
        node = node.setdefault(name, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--{'.'.join(parents[: depth + 1])} is a value, not a section")
    if fields is not None and leaf not in fields:
        raise ConfigError(f"unknown config field --{dotted}: valid here are {', '.join(fields)}")
    node[leaf] = value


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """['--train.epochs', '3', '--model.arch=mlp'] -> nested dict; values are parsed as YAML scalars."""
    data: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"expected --section.field VALUE, got {token!r}")
        if "=" in token:
            key, raw = token[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(tokens):
                raise ConfigError(f"{token} needs a value")
            key, raw = token[2:], tokens[i + 1]
            i += 2
        if "." not in key:
            raise ConfigError(f"--{key}: config fields are written section.field, e.g. --train.epochs")
        try:
            value = load_yaml(raw, f"--{key}")
        except YAMLInputError as err:
            raise ConfigError(str(err)) from None
        _set_dotted(data, key, value)
    return data


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; `override` wins."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Preset YAML (optional) + command-line overrides -> a validated RunConfig."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            presets = sorted(p.name for p in Path("infra/configs").glob("*.yaml"))
            raise ConfigError(f"config file {path} does not exist (presets in infra/configs: {presets})")
        try:
            data = load_yaml(path.read_text(), f"config file {path}") or {}
        except YAMLInputError as err:
            raise ConfigError(str(err)) from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    return validate(merge(data, parse_overrides(overrides or [])))


def with_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """`cfg` with command-line style overrides (`["--train.epochs", "5"]`) applied, validated again."""
    return validate(merge(cfg.model_dump(mode="json"), parse_overrides(overrides)))


def _field_line(section: str, name: str, field: Any, indent: str = "  ") -> str:
    annotation = getattr(field.annotation, "__name__", None) or str(field.annotation).replace("typing.", "")
    default = field.get_default(call_default_factory=True)
    return f"{indent}--{section}.{name} ({annotation}, default {default!r}): {field.description}"


def field_help() -> str:
    """Every config field with its type, default and description: the body of `--help`.

    A union of sections (model) is listed per member: each architecture with the fields it takes.
    """
    lines = []
    for section, info in RunConfig.model_fields.items():
        lines.append(f"{section}:")
        members = get_args(info.annotation)
        if not members:
            lines += [_field_line(section, name, field) for name, field in info.annotation.model_fields.items()]
            continue
        tag = info.discriminator
        default = info.get_default(call_default_factory=True)
        choices = " | ".join(get_args(m.model_fields[tag].annotation)[0] for m in members)
        lines.append(f"  --{section}.{tag} ({choices}, default {getattr(default, tag)!r}): {info.description}")
        for member in members:
            lines.append(f"  {section}.{tag} {get_args(member.model_fields[tag].annotation)[0]}: "
                         f"{member.model_fields[tag].description}")
            lines += [_field_line(section, name, field, "    ") for name, field in member.model_fields.items()
                      if name != tag]
    return "\n".join(lines)




def parse_args(argv: list[str] | None = None, prog: str = "accelerate launch vae/train.py") -> RunConfig:
    """The run config from `--config PRESET [--section.field VALUE ...]`; a bad one exits with status 2, the
    message naming the field. The training entry parses with this, and the supervisor (vae.launch) too, to know
    the output directory it watches."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train a VAE on a shard directory; any config field can be overridden as --section.field VALUE.",
        epilog="config fields:\n" + field_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, help="YAML preset, e.g. infra/configs/digits.yaml")
    args, overrides = parser.parse_known_args(argv)
    try:
        return load_config(args.config, overrides)
    except ConfigError as err:
        parser.error(str(err))
