"""What a trained model is: a JSON spec (architecture, image shape, latent size, constructor options), built from
the run config once, stored in every checkpoint's meta.json, and the model rebuilt from it wherever weights are
loaded (nanochat's `meta_data`).

Only `spec_of` reads the shard index (for the image shape). Everything after training (evaluation, plots,
registration, `python -m vae.tracking` on another machine) rebuilds from the checkpoint alone, needing neither the
live config nor the shard directory and its storage options (an S3 bucket behind an `endpoint_url`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import nn

from vae import checkpoint
from vae.config import RunConfig, validate
from vae.data import image_shape
from vae.errors import TrainingError
from vae.models import build_model


def model_options(cfg: RunConfig) -> dict:
    """Constructor arguments for cfg.model.arch: its model section's fields (exactly what the constructor
    takes: one config section per architecture), plus the output head chosen by the loss section."""
    return {**cfg.model.model_dump(exclude={"arch", "latent_dim"}),
            **cfg.loss.model_dump(include={"likelihood", "mixtures", "gaussian_std"})}


def model_spec(arch: str, image_shape: tuple[int, int, int], latent_dim: int, **options: Any) -> dict:
    """Everything `build_model` needs, as plain JSON data (tuples become lists, as they will after a load)."""
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (C, H, W), got {tuple(image_shape)}")
    spec = {"arch": arch, "image_shape": [int(n) for n in image_shape], "latent_dim": int(latent_dim),
            "options": options}
    return json.loads(json.dumps(spec))  # fails here, not at load time, on options JSON cannot hold


def spec_of(cfg: RunConfig) -> dict:
    """The spec of the model `cfg` trains; reads the shard index (with cfg.ingest.storage_options)."""
    return model_spec(cfg.model.arch, image_shape(cfg), cfg.model.latent_dim, **model_options(cfg))


def build_from_spec(spec: dict) -> nn.Module:
    """An untrained module for `spec`."""
    return build_model(spec["arch"], tuple(spec["image_shape"]), spec["latent_dim"], **spec.get("options", {}))


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
    """The model of checkpoint `path` (EMA weights when kept) in a fresh CPU module, in eval mode, and its meta."""
    meta = checkpoint.read_meta(path)
    model = build_from_spec(checkpoint_spec(meta))
    model.load_state_dict(load_file(weights_file(path)))
    return model.eval(), meta


def load_trained(output_dir: str | Path) -> tuple[nn.Module, dict]:
    """The newest complete checkpoint's model in `output_dir` (see `load_checkpoint`), and its meta.json."""
    path = checkpoint.latest(Path(output_dir))
    if path is None:
        raise TrainingError(f"no complete checkpoint in {output_dir}; train first")
    return load_checkpoint(path)
