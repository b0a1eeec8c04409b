"""The run config: one typed tree of sections (source, ingest, data, model, loss, optim, train, tracking).

The same pydantic models are the Prefect deployment's parameter schema. YAML presets live in `infra/configs/`;
the command line overrides single fields (`--train.batch_size 512`). Invalid values stop the run before any
work with a `ConfigError` naming the field and what is allowed.

- `sections`: every section but the model's, with a description per field;
- `run`: RunConfig, the model union taken from the architectures' own sections (`vae.models.SECTIONS`), the
  legacy upgrade, validation, dump and flatten;
- `command_line`: `--section.field VALUE` overrides, presets, `--help`;
- `yaml_input`: YAML 1.2 scalars with bounded alias expansion.

Owns the schema and its parsing. Never imports training, tracking, registry or launch code, never builds a model
and never reads anything but the preset it is given (a pretrained folder is resolved where the model is built).
"""

from vae.config.command_line import field_help, load_config, merge, parse_args, parse_overrides, with_overrides
from vae.config.run import (
    DEFAULT_ARCH,
    FLAT_MODEL_DEFAULTS,
    MODEL_SECTIONS,
    ConfigError,
    ModelSection,
    RunConfig,
    config_sha256,
    dump,
    flatten,
    upgrade_flat_model,
    validate,
)
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
    check_finite,
)

__all__ = [
    "DEFAULT_ARCH", "FLAT_MODEL_DEFAULTS", "MODEL_SECTIONS", "AeklLossSection", "ConfigError", "DataSection",
    "IngestSection", "LossSection",
    "ModelSection", "OptimSection", "RunConfig", "Section", "SourceSection", "TrackingSection", "TrainSection",
    "check_finite", "config_sha256", "dump", "field_help", "flatten", "load_config", "merge", "parse_args",
    "parse_overrides", "upgrade_flat_model", "validate", "with_overrides",
]
