"""The MLflow pyfunc model, logged as code: `vae.registry.log_model` passes this file's path, not an object.

MLflow runs this file when it logs and again when it loads the model, so nothing is pickled. The model
carries two artifacts, `config` (JSON: arch, image_shape [C, H, W], latent_dim, options) and `weights`
(safetensors), and a copy of `vae.models`, so it loads where vaepipe is not installed.

`predict(images, params={"mode": ...})`, all outputs float32 numpy, all deterministic (no sampling noise):

- `reconstruct` (default): images (N, C, H, W) in [0, 1] -> decoded posterior means (N, C, H, W) in [0, 1],
  i.e. decode(mu), the mean of p(x|z) under the model's likelihood head;
- `encode`: images (N, C, H, W) -> mu (N, D), the mean of q(z|x) in the prior's whitened coordinates (for a
  hierarchical model all groups, flattened; D is the model's `latent_size`);
- `decode`: latents (N, D) -> images (N, C, H, W) in [0, 1];
- `sample`: the same computation as `decode`; the caller draws z ~ N(0, I) of shape (N, D), which keeps the
  model deterministic and the seed in the caller's hands.

MLflow checks the input against the logged signature, images (-1, C, H, W), before `predict` runs, so
through `mlflow.pyfunc.load_model(...).predict` only the image modes are reachable. The latent modes are
reached with `loaded.unwrap_python_model().predict(None, z, params={"mode": "decode"})`, or with the torch
module from `vae.registry.load_torch_model`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from vae.models import build_model


def _reconstruct(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    mu, _ = model.encode(x)  # the posterior mean, not a sample: the same input gives the same output
    return model.decode(mu)


def _encode(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.encode(x)[0]


def _decode(model: nn.Module, z: torch.Tensor) -> torch.Tensor:
    return model.decode(z)


# mode -> (function, what its input is): "images" (N, C, H, W) in [0, 1] or "latents" (N, D)
MODES: dict[str, tuple[Callable[[nn.Module, torch.Tensor], torch.Tensor], str]] = {
    "reconstruct": (_reconstruct, "images"),
    "encode": (_encode, "images"),
    "decode": (_decode, "latents"),
    "sample": (_decode, "latents"),
}


class VAEModel(mlflow.pyfunc.PythonModel):
    """A VAE from `vae.models`, rebuilt from its JSON config and safetensors weights, on CPU, in eval mode."""

    def load_context(self, context) -> None:
        spec = json.loads(Path(context.artifacts["config"]).read_text())
        model = build_model(spec["arch"], tuple(spec["image_shape"]), spec["latent_dim"], **spec.get("options", {}))
        model.load_state_dict(load_file(context.artifacts["weights"], device="cpu"))
        self.model = model.eval()
        self.shapes = {"images": tuple(spec["image_shape"]), "latents": (model.latent_size,)}

    # The ndarray hint tells MLflow to validate against the logged signature rather than the hint.
    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        mode = (params or {}).get("mode", "reconstruct")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
        fn, kind = MODES[mode]
        x = np.array(model_input, dtype=np.float32)  # a writable copy: torch.from_numpy warns on read-only input
        expected = self.shapes[kind]
        if x.ndim != 1 + len(expected) or x.shape[1:] != expected:
            raise ValueError(
                f"mode {mode!r} expects {kind} of shape (N, {', '.join(map(str, expected))}), got {x.shape}"
            )
        # Images outside [0, 1] are almost always unscaled uint8 pixels; the output would be silently wrong.
        if kind == "images" and x.size and (x.min() < 0 or x.max() > 1):
            raise ValueError(f"mode {mode!r} expects pixel values in [0, 1], got [{x.min()}, {x.max()}]")
        with torch.inference_mode():
            return fn(self.model, torch.from_numpy(x)).numpy()


mlflow.models.set_model(VAEModel())
