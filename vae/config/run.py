"""The run config: one tree of sections (source, ingest, data, model, loss, optim, train, tracking), validated
as a whole, dumped to YAML and flattened into MLflow params.

The model section is the union of the architectures' own option sections (`vae.models.SECTIONS`, declared by
each model class), keyed by `model.arch`, so a field the architecture does not take is refused and there is no
second list of architectures here. Configs saved with the older flat model section are upgraded by
`upgrade_flat_model`.

Owns: RunConfig, its cross-section checks, validation into `ConfigError`, dump and flatten. Imports pydantic,
the sections, and `vae.models`' option registry (read, never built).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Annotated, Any, Union

import yaml
from pydantic import Field, ValidationError, model_validator

from pipeline.errors import SourceError
from vae.config.sections import (
    AeklLossSection,
    DataSection,
    IngestSection,
    LossSection,
    OptimSection,
    Section,
    SourceSection,
    TrackingSection,
    TrainSection,
)
from vae.models import SECTIONS


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the field and the allowed values."""


# model.arch -> its section, in name order. Every arch but the default names itself (`arch` required): a
# JSON-schema validator, such as the Prefect server's check of deployment parameters, can then tell which section
# a mapping without `arch` is (the default, conv).
MODEL_SECTIONS = dict(sorted(SECTIONS.items()))
DEFAULT_ARCH = "conv"
ModelSection = Annotated[Union[tuple(MODEL_SECTIONS.values())], Field(discriminator="arch")]  # noqa: UP007

# The single model section of configs saved before the union (meta.json, config.yaml): every architecture's
# fields, with these defaults; `upgrade_flat_model` turns it into the section of its arch.
FLAT_MODEL_DEFAULTS = {"latent_dim": 2, "hidden_dim": 400, "hidden_layers": 1, "width": 32, "depth": 2, "blocks": 1,
                       "groups": 2}


def upgrade_flat_model(section: dict[str, Any]) -> dict[str, Any]:
    """An old flat model section -> the section of its arch, without the fields that arch does not take.

    The old trainer passed an architecture only the fields its constructor names (trainer.model_options), so
    dropping the others describes exactly the model that was trained. One set to a non-default value had no
    effect then either; it is dropped with a warning rather than stranding the checkpoint.
    """
    arch = section.get("arch", DEFAULT_ARCH)
    if arch not in MODEL_SECTIONS:
        return section  # validation names the valid architectures
    own = MODEL_SECTIONS[arch].model_fields
    ignored = {k: v for k, v in section.items() if k not in own and v != FLAT_MODEL_DEFAULTS.get(k)}
    if ignored:
        warnings.warn(f"saved config: model.arch {arch!r} never took {ignored} (the old trainer ignored them); "
                      "dropped", stacklevel=2)
    return {k: v for k, v in section.items() if k in own}


class RunConfig(Section):
    """Everything one training run needs."""

    source: SourceSection = Field(default_factory=SourceSection)
    ingest: IngestSection = Field(default_factory=IngestSection)
    data: DataSection = Field(default_factory=DataSection)
    model: ModelSection = Field(default_factory=MODEL_SECTIONS[DEFAULT_ARCH],
                                description="The architecture and its options; "
                                "one section per model.arch, each with its own fields.")
    loss: LossSection = Field(default_factory=LossSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    train: TrainSection = Field(default_factory=TrainSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)

    @model_validator(mode="before")
    @classmethod
    def _model_section(cls, data: Any) -> Any:
        """A model section without `arch` is the default architecture's; an old flat one is upgraded."""
        model = data.get("model") if isinstance(data, dict) else None
        if not isinstance(model, dict):
            return data
        if set(model) == {"arch", *FLAT_MODEL_DEFAULTS}:
            model = upgrade_flat_model(model)
        return {**data, "model": {"arch": DEFAULT_ARCH, **model}}

    @model_validator(mode="after")
    def _check_combinations(self) -> RunConfig:
        """Combinations that would train without error but measure nonsense, refused before any work."""
        loss = self.loss

        def on(name: str) -> bool:  # the data section's binarize / dequantize switches (bool or a mode name)
            return getattr(self.data, name, None) not in (None, False, 0, "none", "no", "off")

        if loss.likelihood == "logistic_mixture" and on("binarize"):
            raise ValueError("loss.likelihood 'logistic_mixture' models 8-bit pixels, but data.binarize makes them "
                             "0/1: use --loss.likelihood bernoulli, or turn data.binarize off")
        if loss.likelihood == "logistic_mixture" and on("dequantize"):
            raise ValueError("loss.likelihood 'logistic_mixture' is discrete and needs the exact 8-bit values: turn "
                             "data.dequantize off (dequantise only for a gaussian likelihood)")
        if self.model.arch != "aekl" and loss.aekl != AeklLossSection():
            raise ValueError(f"loss.aekl configures the aekl objective, but model.arch is {self.model.arch!r}: "
                             "remove the loss.aekl fields, or use --model.arch aekl")
        if self.model.arch == "aekl" and loss.likelihood not in ("bernoulli", "gaussian"):
            raise ValueError(f"model.arch 'aekl' decodes images (one value per channel), so loss.likelihood "
                             f"{loss.likelihood!r} cannot be used: set --loss.likelihood gaussian or bernoulli")
        if loss.objective == "iwae" and (loss.beta != 1 or loss.warmup_steps or loss.free_bits):
            raise ValueError("loss.objective 'iwae' is the bound itself: set loss.beta 1, loss.warmup_steps 0 and "
                             "loss.free_bits 0, or use --loss.objective elbo")
        return self

    @property
    def shard_dir(self) -> Path:
        return self.ingest.shard_dir or Path("data/shards") / self.source.name

    @property
    def model_name(self) -> str:
        return self.tracking.model_name or f"{type(self.model).name_prefix}-{self.source.name}"


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        # pydantic puts a union's tag in the location (model.mlp.width): the user wrote model.width
        union = e["loc"] and e["loc"][0] in RunConfig.model_fields and RunConfig.model_fields[e["loc"][0]].discriminator
        loc = [str(p) for i, p in enumerate(e["loc"]) if not (union and i == 1)]
        if e["type"] == "union_tag_invalid":  # an unknown model.arch
            loc.append(e["ctx"]["discriminator"].strip("'"))
            lines.append(f"{'.'.join(loc)}: Input should be {e['ctx']['expected_tags']} (got {e['ctx']['tag']!r})")
        elif e["type"] == "value_error":  # our own validators' messages name the field and the fix
            message, field = str(e["ctx"]["error"]), ".".join(loc)
            lines.append(message if message.startswith(field) else f"{field}: {message}")
        else:
            lines.append(f"{'.'.join(loc)}: {e['msg']} (got {e.get('input')!r})")
    return "invalid config: " + "; ".join(lines)


def validate(data: dict[str, Any]) -> RunConfig:
    """Build a RunConfig from plain data, turning pydantic's errors into a one-line ConfigError."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err)) from None
    except SourceError as err:
        raise ConfigError(str(err)) from None


def dump(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def flatten(cfg: RunConfig) -> dict[str, str]:
    """Dotted key -> string value, for MLflow params."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = str(value)

    walk("", cfg.model_dump(mode="json"))
    return out


def config_sha256(cfg: RunConfig) -> str:
    """sha256 of the resolved config as sorted, compact JSON: equal configs hash equal across runs."""
    text = json.dumps(cfg.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()
