"""The MLflow pyfunc model, logged as code: `vae.registry.log_model` passes this file's path, not an object.

MLflow runs this file when it logs and again when it loads the model, so nothing is pickled. The model
carries two artifacts, `config` (JSON: arch, image_shape [C, H, W], latent_dim, options) and `weights`
(safetensors), and a copy of `vae.models`, so it loads where vaepipe is not installed.

`predict(data, params={"mode": ..., "seed": ..., "temperature": ...})`, every output float32 numpy. D is the
model's `latent_size` (for a hierarchical model all groups, flattened); latents are in the prior's whitened
coordinates, so z ~ N(0, I) is a draw from the prior.

- `reconstruct` (default): images (N, C, H, W) in [0, 1] -> decode(encode(x)), the mean of p(x|z) at the
  posterior mean, (N, C, H, W) in [0, 1]; deterministic, no sampling noise;
- `encode`: images (N, C, H, W) in [0, 1] -> the posterior means mu (N, D);
- `decode`: latents (N, D) -> images (N, C, H, W) in [0, 1]; decode(encode(x)) is exactly reconstruct(x);
- `sample`: a count N (a number, or a one-element array) -> N prior samples decoded, (N, C, H, W), from
  z = temperature * u, u ~ N(0, I) drawn with the `seed` param (default 0: the same N images every call;
  temperature default 1.0; lower it for smoother, more typical images).

The same calls work in-process (`mlflow.pyfunc.load_model(uri).predict(data, params=...)`) and over REST
(`mlflow models serve`, POST /invocations `{"inputs": data, "params": {...}}`). One MLflow input schema cannot
describe images, latents and a count (a tensor spec fixes the number of dimensions), so the logged signature
declares only the params, which MLflow type-checks and fills with the defaults; this file checks the input
against the mode and names the shape it expects.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from safetensors.torch import load_file

from vae.models import build_model

# The inference params with their defaults; vae.registry logs them as the signature's ParamSchema.
PARAMS: dict[str, Any] = {"mode": "reconstruct", "seed": 0, "temperature": 1.0}


class InputError(MlflowException, ValueError):
    """Input that does not fit the mode: a ValueError in-process, and over REST a 400 that carries this
    message (the scoring server turns any other exception into a 500 saying only "unexpected error")."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


class VAEModel(mlflow.pyfunc.PythonModel):
    """A VAE from `vae.models`, rebuilt from its JSON config and safetensors weights, on CPU, in eval mode."""

    def load_context(self, context) -> None:
        spec = json.loads(Path(context.artifacts["config"]).read_text())
        model = build_model(spec["arch"], tuple(spec["image_shape"]), spec["latent_dim"], **spec.get("options", {}))
        model.load_state_dict(load_file(context.artifacts["weights"], device="cpu"))
        self.model = model.eval()
        self.image_shape = tuple(spec["image_shape"])
        # mode -> the function computing it from the raw input and the params
        self.modes: dict[str, Callable[[Any, dict], torch.Tensor]] = {
            "reconstruct": lambda data, _: self.model.decode(self.model.encode(self._images(data, "reconstruct"))[0]),
            "encode": lambda data, _: self.model.encode(self._images(data, "encode"))[0],
            "decode": lambda data, _: self.model.decode(self._latents(data)),
            "sample": self._sample,
        }

    # The ndarray hint keeps MLflow from deriving an input schema from the type hint: the mode decides the shape.
    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        params = {**PARAMS, **(params or {})}
        mode = params["mode"]
        if mode not in self.modes:
            raise InputError(f"unknown mode {mode!r}; valid: {', '.join(self.modes)}")
        with torch.inference_mode():
            return self.modes[mode](model_input, params).numpy()

    def _array(self, data: Any, mode: str, kind: str, shape: tuple[int, ...]) -> torch.Tensor:
        x = np.array(data, dtype=np.float32)  # a writable copy: torch.from_numpy warns on read-only input
        if x.ndim != 1 + len(shape) or x.shape[1:] != shape:
            raise InputError(f"mode {mode!r} expects {kind} of shape (N, {', '.join(map(str, shape))}), got {x.shape}")
        return torch.from_numpy(x)

    def _images(self, data: Any, mode: str) -> torch.Tensor:
        x = self._array(data, mode, "images", self.image_shape)
        # Images outside [0, 1] are almost always unscaled uint8 pixels; the output would be silently wrong.
        if x.numel() and (x.min() < 0 or x.max() > 1):
            raise InputError(f"mode {mode!r} expects pixel values in [0, 1] (divide uint8 images by 255), "
                             f"got [{x.min().item()}, {x.max().item()}]")
        return x

    def _latents(self, data: Any) -> torch.Tensor:
        return self._array(data, "decode", "latents", (self.model.latent_size,))

    def _sample(self, data: Any, params: dict) -> torch.Tensor:
        count = np.asarray(data)
        n = count.item() if count.size == 1 and count.ndim <= 1 else None
        if not isinstance(n, (int, float)) or not math.isfinite(n) or n < 1 or n != int(n):
            got = f"an array of shape {count.shape}" if n is None else repr(n)
            raise InputError(f"mode 'sample' expects the number of samples, a positive integer such as 16 or [16], "
                             f"got {got}")
        temperature = float(params["temperature"])
        if not temperature > 0:
            raise InputError(f"param 'temperature' must be positive (1.0 samples the prior), got {temperature}")
        generator = torch.Generator().manual_seed(int(params["seed"]))
        u = torch.randn(int(n), self.model.latent_size, generator=generator)
        return self.model.decode(temperature * u)


mlflow.models.set_model(VAEModel())
