"""The encoder of an encode: a registered aekl model (`models:/NAME@ALIAS`, `models:/NAME/VERSION`) or a diffusers
folder, loaded as diffusers' own `AutoencoderKL` with its latent statistics and where it came from.

A registered aekl version carries its diffusers folder as an artifact (vae/registry/packaging.py), with the
evaluation's `scaling_factor` and `shift_factor` in its config; a folder brings its own config. Either way the
module that encodes is the one a diffusion pipeline will decode with.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vae.registry.store import pull_diffusers

MODELS_SCHEME = "models:/"


@dataclass
class Encoder:
    vae: Any  # diffusers.AutoencoderKL, in eval mode, on the CPU
    provenance: dict[str, Any]  # {'uri', 'name', 'version'} or {'folder'}: what index.json records
    scaling_factor: float
    shift_factor: float
    latents_mean: list[float] | None
    latents_std: list[float] | None

    @property
    def factor(self) -> int:
        """The spatial downsampling factor f: the latent is (C, H / f, W / f)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def _from_folder(folder: str | os.PathLike, provenance: dict[str, Any]) -> Encoder:
    from diffusers import AutoencoderKL  # ~2 s; only an encode needs it

    vae = AutoencoderKL.from_pretrained(str(folder), use_safetensors=True).eval()
    config = vae.config
    return Encoder(vae, provenance, float(config.scaling_factor),
                   float(getattr(config, "shift_factor", None) or 0.0),
                   getattr(config, "latents_mean", None), getattr(config, "latents_std", None))


def load_encoder(model: str, tracking_uri: str | None = None) -> Encoder:
    """`models:/NAME@ALIAS`, `models:/NAME/VERSION` (pulled from `tracking_uri`) or a diffusers folder."""
    if not model.startswith(MODELS_SCHEME):
        folder = Path(model)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{model} is neither models:/NAME@ALIAS, models:/NAME/VERSION nor a diffusers "
                                    "folder (config.json + diffusion_pytorch_model.safetensors)")
        return _from_folder(folder, {"folder": str(folder.resolve())})
    if tracking_uri is None:
        raise ValueError(f"{model} names a registered model: give the MLflow tracking URI that holds it")
    with tempfile.TemporaryDirectory(prefix="vaepipe-encode-") as tmp:
        name, version, folder = pull_diffusers(model[len(MODELS_SCHEME):], Path(tmp) / "vae", tracking_uri)
        return _from_folder(folder, {"uri": model, "name": name, "version": version,
                                     "version_uri": f"models:/{name}/{version}"})
