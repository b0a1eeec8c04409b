"""Export an aekl model as a diffusers folder: `config.json` + `diffusion_pytorch_model.safetensors`.

`AutoencoderKL.from_pretrained(DIR)` loads the folder with no vaepipe installed, and diffusion pipelines take
it as their `vae`. The latent statistics of the evaluation (vae/objectives/aekl/evaluation.py) go into its config:
`scaling_factor` (1 / std of the latents), `shift_factor` (their mean), and per channel `latents_mean` and
`latents_std`; a pipeline then trains on `(z - shift_factor) * scaling_factor`.

A model spec (vae/models/spec.py: arch, image_shape, latent_dim, options) may carry those statistics under
`latent_stats` ({"shift_factor", "scaling_factor", "mean", "std"}); `build_model` never reads that key.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from torch import nn

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def diffusers_config(stats: dict[str, Any] | None) -> dict[str, Any]:
    """Latent statistics -> the AutoencoderKL config fields that carry them (empty without statistics)."""
    if not stats:
        return {}
    return {"scaling_factor": float(stats["scaling_factor"]), "shift_factor": float(stats["shift_factor"]),
            "latents_mean": [float(v) for v in stats["mean"]], "latents_std": [float(v) for v in stats["std"]]}


def export_diffusers(model: nn.Module, out_dir: str | Path, stats: dict[str, Any] | None = None) -> Path:
    """Write `model.vae` (an aekl model's AutoencoderKL) as a diffusers folder, with the latent statistics in
    its config. `out_dir` must be missing or empty; the model itself is not changed."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty: give a new or empty directory for the diffusers folder")
    vae = getattr(model, "vae", None)
    if vae is None or type(vae).__name__ != "AutoencoderKL":
        raise ValueError(f"only model.arch 'aekl' exports as a diffusers folder, not a {type(model).__name__}")
    vae = copy.deepcopy(vae).to("cpu")
    fields = diffusers_config(stats)
    if fields:
        vae.register_to_config(**fields)
    vae.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
