"""What a trained model is: a JSON spec (architecture, image shape, latent size, constructor options), stored in
every checkpoint's meta.json and every logged MLflow model, and the model rebuilt from it wherever weights are
loaded (nanochat's `meta_data`). Building the spec from a run config is training's job (vae/training/trained.py).

A spec's options may name weights on the training machine to start from (aekl's `pretrained`); a model whose own
weights are loaded next is rebuilt from its `portable_spec`, which needs none of them.
"""

from __future__ import annotations

import json
from typing import Any

from torch import nn

from vae.models import build_model

LOCAL_OPTIONS = ("pretrained", "pretrained_subfolder")  # where starting weights were: a folder, a cached repo, a file


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


def portable_spec(spec: dict) -> dict:
    """The spec without what only the training machine has: pretrained weights (a folder, a cached repo, a file)
    are in the model's own weights by now, and their architecture in the options (vae.models.aekl.with_pretrained
    filled them)."""
    options = {k: v for k, v in spec.get("options", {}).items() if k not in LOCAL_OPTIONS}
    return {**spec, "options": options}
