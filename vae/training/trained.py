"""The model a run trains and the models its checkpoints hold: the spec (vae/models/spec.py) built from the run
config once, stored in every checkpoint's meta.json, and the model rebuilt from it wherever weights are loaded.

Only `spec_of` reads the shard index (for the image shape). Everything after training (evaluation, plots,
registration, `python -m vae.tracking` on another machine) rebuilds from the checkpoint alone, needing neither the
live config nor the shard directory and its storage options (an S3 bucket behind an `endpoint_url`).
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from vae.config import ConfigError, RunConfig, validate
from vae.models import resolve_options
from vae.models.spec import build_from_spec, model_spec, portable_spec
from vae.training import checkpoint
from vae.training.data import image_shape
from vae.training.errors import TrainingError


def resolve_model(cfg: RunConfig) -> RunConfig:
    """`cfg` with what its model section leaves to files filled in (aekl: a pretrained folder's architecture), so
    the resolved config that training saves describes the model it trains; a disagreement is a ConfigError."""
    try:
        model = resolve_options(cfg.model)
    except ValueError as err:
        raise ConfigError(f"invalid config: {err}") from None
    return cfg if model is cfg.model else validate({**cfg.model_dump(mode="json"),
                                                    "model": model.model_dump(mode="json")})


def model_options(cfg: RunConfig) -> dict:
    """Constructor arguments for cfg.model.arch: its model section's fields (exactly what the constructor
    takes: one config section per architecture), plus the output head chosen by the loss section."""
    return {**cfg.model.constructor_options(),
            **cfg.loss.model_dump(include={"likelihood", "mixtures", "gaussian_std"})}


def spec_of(cfg: RunConfig) -> dict:
    """The spec of the model `cfg` trains; reads the shard index (with cfg.ingest.storage_options)."""
    return model_spec(cfg.model.arch, image_shape(cfg), cfg.model.latent_dim, **model_options(cfg))


def checkpoint_spec(meta: dict) -> dict:
    """The model spec of a checkpoint's meta.json. Upgrade: checkpoints written before the spec was stored carry
    only the config, so their spec is rebuilt from it (reading the shard index once more, as training did)."""
    if "model_spec" in meta:
        return meta["model_spec"]
    return spec_of(validate(meta["config"]))


def weights_file(path: Path) -> Path:
    """The weights a checkpoint ships: the EMA weights when the run kept them, else the trained ones."""
    ema = path / checkpoint.EMA_WEIGHTS
    return ema if ema.is_file() else path / "model.safetensors"


def load_checkpoint(path: Path) -> tuple[nn.Module, dict]:
    """The model of checkpoint `path` (EMA weights when kept) in a fresh CPU module, in eval mode, and its meta.
    The module is built without the weights the run started from (its `portable_spec`): the checkpoint holds all
    of them, and they may be on the training machine only."""
    meta = checkpoint.read_meta(path)
    model = build_from_spec(portable_spec(checkpoint_spec(meta)))
    model.load_state_dict(load_file(weights_file(path)))
    return model.eval(), meta


def load_trained(output_dir: str | Path) -> tuple[nn.Module, dict]:
    """The newest complete checkpoint's model in `output_dir` (see `load_checkpoint`), and its meta.json."""
    path = checkpoint.latest(Path(output_dir))
    if path is None:
        raise TrainingError(f"no complete checkpoint in {output_dir}; train first")
    return load_checkpoint(path)
