"""The MLflow pyfunc model, logged as code: `vae.registry.packaging.log_model` passes this file's path, not an object.

MLflow runs this file when it logs and again when it loads the model, so nothing is pickled. The model
carries two artifacts, `config` (JSON: arch, image_shape [C, H, W], latent_dim, options) and `weights`
(safetensors), and a copy of `vae.models`, so it loads where vaepipe is not installed. Its MLflow
`model_config` holds the `ServingLimits`.

`predict(data, params={"mode": ..., "seed": ..., "temperature": ...})`, every output float32 numpy. D is the
model's `latent_size` (for a hierarchical model all groups, flattened); latents are in the prior's whitened
coordinates, so z ~ N(0, I) is a draw from the prior.

- `reconstruct` (default): images (N, C, H, W) in [0, 1] -> decode(encode(x)), the mean of p(x|z) at the
  posterior mean, (N, C, H, W) in [0, 1]; deterministic, no sampling noise;
- `encode`: images (N, C, H, W) in [0, 1] -> the posterior means mu (N, D); for aekl the spatial latent
  (N, latent channels, H / f, W / f), unscaled (diffusers' `latent_dist.mean`);
- `decode`: latents (N, D) -> images (N, C, H, W) in [0, 1]; decode(encode(x)) is exactly reconstruct(x); aekl
  also takes its spatial latents (N, c, h, w), c its latent channels, and gives images (N, C, h * f, w * f);
- `sample`: a count N (a number, or a one-element array) -> N prior samples decoded, (N, C, H, W), from
  z = temperature * u, u ~ N(0, I) drawn with the `seed` param (default 0: the same N images every call;
  temperature default 1.0; lower it for smoother, more typical images).

The same calls work in-process (`mlflow.pyfunc.load_model(uri).predict(data, params=...)`) and over REST
(`mlflow models serve`, POST /invocations `{"inputs": data, "params": {...}}`). One MLflow input schema cannot
describe images, latents and a count (a tensor spec fixes the number of dimensions), so the logged signature
declares only the params, which MLflow type-checks and fills with the defaults; this file checks the input
against the mode and names the shape it expects.

Image size: aekl, like `AutoencoderKL`, takes images of any H and W that its down-sampling factor f divides (a
VAE trained at 256 px encodes 1024 px), and spatial latents of any h and w; the other architectures have dense
latents and take their training shape only (`sample` always draws that shape). The work is bounded by pixels:
a request of more than `max_pixels` (images in, or images out for decode and sample) is refused before any
compute, and aekl encodes and decodes an image with a side over `tile_size` tile by tile (diffusers' tiling),
so one huge image cannot exhaust memory either. Tiling is a limit, set by whoever loads or serves the model, not
a request param: memory is the server's to bound, and one deployment gives one answer to one request.

Served, every refusal is an `InputError`: MLflow's scoring server answers an MlflowException with its error
code's status (INVALID_PARAMETER_VALUE: 400) and a body of error_code and message, but any other exception
with a 400 whose body holds the server's stack trace. So input is checked before any work (counts against
the limits, booleans, non-numbers, NaN and inf), and an unexpected failure inside the model is logged here
and answered as a 500 without the trace. Output that is not finite is refused too: JSON has no NaN, and
MLflow would write bare `NaN` tokens that no JSON parser accepts.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file

from vae.models import build_model

# The inference params with their defaults; vae.registry logs them as the signature's ParamSchema.
PARAMS: dict[str, Any] = {"mode": "reconstruct", "seed": 0, "temperature": 1.0}
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
LATENT_MODES = ("decode", "sample")  # the request sets their latents' scale, so a non-finite output is its doing

_logger = logging.getLogger("vae.mlflow_model")  # the name it had before the move: log filters keep working


class ServingLimits(BaseModel):
    """What one request may ask of the model, stored as the logged model's MLflow `model_config`: set when
    logging (`vae.registry.packaging.log_model(..., limits=...)`), or when loading (`mlflow.pyfunc.load_model(uri,
    model_config={...})`, or `MLFLOW_PYFUNC_INFERENCE_CONFIG='{"max_samples": 64}'` for `mlflow models serve`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    max_samples: int = Field(1024, gt=0, description="Most images one `sample` request may ask for; more is refused "
                                                      "(unbounded, a count of 10^9 asked torch for 8 GB).")
    max_images: int = Field(1024, gt=0, description="Most images (reconstruct, encode) or latent rows (decode) in one "
                                                     "request; more is refused.")
    max_pixels: int = Field(2**24, gt=0, description="Most pixels (N x H x W of the images in, or out for decode and "
                                                      "sample) in one request, refused before any compute; 2**24 is "
                                                      "sixteen 1024 x 1024 images. A config written before it "
                                                      "existed gets this default, which a load-time override cannot "
                                                      "change (MLflow only replaces keys the logged config has).")
    chunk_rows: int = Field(256, gt=0, description="Rows the network runs on at once, so peak memory for activations "
                                                    "is bounded by this, not by the request; images larger than the "
                                                    "training size run in proportionally fewer rows (at least one).")
    tile_size: int = Field(1024, ge=0, description="aekl: an image with a side over this many pixels is encoded and "
                                                    "decoded in tiles of this side (diffusers' tiling), so memory is "
                                                    "bounded by the tile; 0 never tiles. A multiple of 4 f (1024 is, "
                                                    "for every f); sides up to it (SD's and SDXL's sizes) run whole.")


class InputError(MlflowException, ValueError):
    """Input that does not fit the mode or the limits: a ValueError in-process, and over REST a 400 whose body
    carries this one-line message (MLflow prefixes it with the input it received) and no stack trace."""

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
        # aekl's latents are spatial (c, h, w): encode returns them so, decode takes them so (or flat)
        self.latent_shape = tuple(getattr(model, "latent_shape", (model.latent_size,)))
        # a model logged without limits, or before one was added, gets the defaults of those it lacks
        self.limits = ServingLimits(**(context.model_config or {}))
        # aekl (spatial latents): any H and W that f divides, and tiling; None: the training shape only
        self.factor: int | None = getattr(model, "factor", None)
        if self.factor is not None:
            model.tile(self.limits.tile_size)  # a size that is not a multiple of 4 f is refused here, at load
        # mode -> the function computing it from the raw input and the params
        self.modes: dict[str, Callable[[Any, dict], torch.Tensor]] = {
            "reconstruct": lambda data, _: self._chunked(lambda x: self._decode(self._encode(x)),
                                                         self._images(data, "reconstruct"), self.image_shape),
            "encode": lambda data, _: self._chunked(self._encode, self._images(data, "encode"), self.image_shape),
            "decode": lambda data, _: self._chunked(self._decode, self._latents(data), self.latent_shape),
            "sample": self._sample,
        }

    # The ndarray hint keeps MLflow from deriving an input schema from the type hint: the mode decides the shape.
    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        params = {**PARAMS, **(params or {})}
        mode = params["mode"]
        if mode not in self.modes:
            raise InputError(f"unknown mode {mode!r}; valid: {', '.join(self.modes)}")
        try:
            with torch.inference_mode():
                out = self.modes[mode](model_input, params)
        except MlflowException:
            raise
        except Exception as err:
            # Not swallowed: the trace goes to the server's log and the error to the caller, chained in-process;
            # over REST the scoring server would otherwise put the whole trace in the response body.
            _logger.exception("mode %r failed inside the model", mode)
            raise MlflowException(f"mode {mode!r} failed inside the model ({type(err).__name__}); the server log "
                                  "has the details", error_code=INTERNAL_ERROR) from err
        if not torch.isfinite(out).all():
            message = f"mode {mode!r} gave non-finite values (NaN or inf), which JSON cannot carry"
            if mode in LATENT_MODES:
                raise InputError(f"{message}: use smaller latents or temperature (the prior is N(0, I))")
            raise MlflowException(f"{message}, for finite images in [0, 1]: the model itself is at fault",
                                  error_code=INTERNAL_ERROR)
        return out.numpy()

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) -> posterior means: aekl's spatial (N, c, H / f, W / f), the others' flat (N, D)."""
        return self.model.encode(x)[0] if self.factor is None else self.model.encode_latents(x)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents, as `_encode` gives them -> images (N, C, H, W) in [0, 1]."""
        return self.model.decode(z) if self.factor is None else self.model.decode_latents(z)

    def _chunked(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                 trained: tuple[int, ...]) -> torch.Tensor:
        """fn over `x` (N, ...) in chunks of `chunk_rows` rows, so a request's activations never all live at once.
        `trained` is a row's shape at the training size: larger rows (aekl images or latents) run proportionally
        fewer to a chunk, at least one, so a chunk holds no more pixels than `chunk_rows` training images."""
        rows = max(1, self.limits.chunk_rows * math.prod(trained) // max(1, math.prod(x.shape[1:])))
        return torch.cat([fn(part) for part in x.split(rows)])

    def _array(self, data: Any, mode: str, expects: str, fits: Callable[[tuple[int, ...]], bool],
               side: Callable[[tuple[int, ...]], tuple[int, int]]) -> torch.Tensor:
        """`data` as float32 (N, ...), refused unless it is numbers (not booleans), a row's shape `fits`, N is
        from 1 to max_images, the N images of `side(row shape)` (H, W), in or out, within max_pixels, and every value
        is finite. `expects` opens each refusal ("mode 'encode' expects images of shape (N, 3, 64, 64)")."""
        try:
            x = np.asarray(data)
        except ValueError as err:  # ragged nested lists
            raise InputError(f"{expects}, got nested lists of unequal lengths ({err})") from None
        if x.dtype == np.bool_ or x.dtype.kind not in "iuf":
            raise InputError(f"{expects} as numbers, got {'booleans' if x.dtype == np.bool_ else f'dtype {x.dtype}'}")
        if x.ndim < 2 or not fits(x.shape[1:]):
            raise InputError(f"{expects}, got {x.shape}")
        if len(x) == 0:  # torch would fail deep inside the model (a 500) on an empty batch
            raise InputError(f"{expects} with N at least 1, got {x.shape}; send at least one")
        if len(x) > self.limits.max_images:
            raise InputError(f"{expects} with N at most {self.limits.max_images} per request (the model's "
                             f"max_images), got N = {len(x)}; split the batch")
        self._bound_pixels(mode, len(x), side(x.shape[1:]))  # before the copy below: a refusal costs no memory
        with np.errstate(over="ignore"):  # values beyond float32 become inf, refused just below
            x = torch.from_numpy(np.array(x, dtype=np.float32))  # a writable copy: from_numpy warns on read-only input
        if not torch.isfinite(x).all():
            raise InputError(f"{expects} with finite values, got {int((~torch.isfinite(x)).sum())} NaN or "
                             "infinite (or beyond float32)")
        return x

    def _bound_pixels(self, mode: str, n: int, side: tuple[int, int]) -> None:
        """Refuse, before any compute, a request of `n` images of `side` (H, W) past `max_pixels`."""
        h, w = side
        if n * h * w > self.limits.max_pixels:
            raise InputError(f"mode {mode!r} takes at most {self.limits.max_pixels} pixels per request (the model's "
                             f"max_pixels), got {n} images of {h} x {w} = {n * h * w}; send fewer or smaller images "
                             "per request, or raise max_pixels where the model is loaded or served")

    def _images(self, data: Any, mode: str) -> torch.Tensor:
        c, h, w = self.image_shape
        if self.factor is None:  # dense latents: the training shape only
            expects = f"mode {mode!r} expects images of shape (N, {c}, {h}, {w})"
            x = self._array(data, mode, expects, lambda row: row == self.image_shape, lambda row: row[1:])
        else:
            f = self.factor
            expects = f"mode {mode!r} expects images of shape (N, {c}, H, W), H and W multiples of {f}"
            x = self._array(data, mode, expects, lambda row: len(row) == 3 and row[0] == c and all(
                n > 0 and n % f == 0 for n in row[1:]), lambda row: row[1:])
        # Images outside [0, 1] are almost always unscaled uint8 pixels; the output would be silently wrong.
        if x.numel() and (x.min() < 0 or x.max() > 1):
            raise InputError(f"mode {mode!r} expects pixel values in [0, 1] (divide uint8 images by 255), "
                             f"got [{x.min().item()}, {x.max().item()}]")
        return x

    def _latents(self, data: Any) -> torch.Tensor:
        """Latents for `_decode`: flat (N, D); for aekl spatial (N, c, h, w), any h and w, flat ones (at the
        training size) reshaped so."""
        flat = (self.model.latent_size,)
        if self.factor is None:
            return self._array(data, "decode", f"mode 'decode' expects latents of shape (N, {flat[0]})",
                               lambda row: row == flat, lambda row: self.image_shape[1:])
        (c, h, w), f = self.latent_shape, self.factor
        expects = (f"mode 'decode' expects latents of shape (N, {c}, h, w), or (N, {flat[0]}) flattened at the "
                   f"training size ({c}, {h}, {w})")

        def side(row: tuple[int, ...]) -> tuple[int, int]:  # of the images they decode to
            return (h * f, w * f) if row == flat else (row[1] * f, row[2] * f)
        z = self._array(data, "decode", expects,
                        lambda row: row == flat or (len(row) == 3 and row[0] == c and min(row) > 0), side)
        return z.reshape(len(z), *self.latent_shape) if z.ndim == 2 else z

    def _sample(self, data: Any, params: dict) -> torch.Tensor:
        n = self._count(data)
        temperature, seed = params["temperature"], params["seed"]
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
                math.isfinite(temperature) and temperature > 0):
            raise InputError(f"param 'temperature' must be positive and finite (1.0 samples the prior), "
                             f"got {temperature!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not (
                SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
            raise InputError(f"param 'seed' must be an integer from -2**63 to 2**64 - 1, got {seed!r}")
        self._bound_pixels("sample", n, self.image_shape[1:])
        generator = torch.Generator().manual_seed(int(seed))
        # All of u at once (N x D floats, small under max_samples), so the images do not depend on chunk_rows.
        u = torch.randn(n, self.model.latent_size, generator=generator)
        return self._chunked(self.model.decode, float(temperature) * u, (self.model.latent_size,))

    def _count(self, data: Any) -> int:
        """The number of samples in `data`: a positive integer (16, 16.0 or [16]) up to `max_samples`."""
        count = np.asarray(data)
        n = count.item() if count.size == 1 and count.ndim <= 1 else None
        if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n < 1 or n != int(n):
            got = f"an array of shape {count.shape}" if n is None else repr(n)
            raise InputError(f"mode 'sample' expects the number of samples, a positive integer such as 16 or [16], "
                             f"got {got}")
        if n > self.limits.max_samples:
            raise InputError(f"mode 'sample' draws at most {self.limits.max_samples} images per request (the model's "
                             f"max_samples), got {int(n)}; ask in several requests with different seeds")
        return int(n)


mlflow.models.set_model(VAEModel())
