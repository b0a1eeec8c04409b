"""What a trained model is: a JSON spec (architecture, image shape, latent size, constructor options), stored in
every checkpoint's meta.json and every logged MLflow model, and the model rebuilt from it wherever weights are
loaded (nanochat's `meta_data`). Building the spec from a run config is training's job (vae/training/trained.py).
"""

from __future__ import annotations

import json
from typing import Any

from torch import nn

from vae.models import build_model


def model_spec(arch: str, image_shape: tuple[int, int, int], latent_dim: int, **options: Any) -> dict:
    """Everything `build_model` needs, as plain JSON data (tuples become lists, as they will after a load)."""
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (C, H, W), got {tuple(image_shape)}")
    spec = {"arch": arch, "image_shape": [int(n) for n in image_shape], "latent_dim": int(latent_dim),
            "options": options}
    return json.loads(json.dumps(spec))  # fails here, not at load time, on options JSON cannot hold


def build_from_spec(spec: dict) -> nn.Module:
    """An untrained module for `spec`."""
    return build_model(spec["arch"], tuple(spec["image_shape"]), spec["latent_dim"], **spec.get("options", {}))
