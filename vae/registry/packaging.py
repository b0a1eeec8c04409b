"""A trained VAE as an MLflow model: logged into a run, saved to a folder, and loaded back as a torch module.

The MLflow model is `vae/registry/pyfunc.py` logged as code, with the spec as JSON and the weights as
safetensors, and a copy of `vae.models` as its code: nothing is pickled, and it loads where vaepipe is not
installed. An aekl model also carries its diffusers folder (vae/registry/diffusers.py).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.models import Model, infer_signature
from safetensors.torch import load_file, save_file
from torch import nn

from vae.models.spec import build_from_spec, portable_spec
from vae.registry.diffusers import export_diffusers
from vae.registry.pyfunc import PARAMS, ServingLimits

VAE_PACKAGE = Path(__file__).resolve().parents[1]  # the `vae` package, of which the model carries `models`
MODEL_CODE = Path(__file__).with_name("pyfunc.py")
REQUIREMENTS = ("torch", "safetensors", "numpy", "mlflow", "pydantic")
DIFFUSERS_ARTIFACT = "diffusers"  # an aekl model's diffusers folder (config.json + safetensors)


def _model_code(dst: Path) -> Path:
    """A copy of the `vae` package holding only what the model file imports (the package init and models)."""
    package = dst / "vae"
    shutil.copytree(VAE_PACKAGE / "models", package / "models", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(VAE_PACKAGE / "__init__.py", package / "__init__.py")
    return package


def _requirements(model: nn.Module) -> list[str]:
    # Pinned to what produced the model, without the local tag: a "+cpu" torch pin would refuse CUDA builds.
    # An architecture built on another library names it in `requirements` (aekl: diffusers).
    names = (*REQUIREMENTS, *getattr(model, "requirements", ()))
    return [f"{name}=={installed_version(name).split('+')[0]}" for name in names]


def _pyfunc_kwargs(model: nn.Module, spec: dict, tmp: Path, input_example: np.ndarray | None,
                   limits: ServingLimits | None) -> dict[str, Any]:
    """The arguments `mlflow.pyfunc.log_model` and `save_model` share for `model`, its files written in `tmp`."""
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    spec = portable_spec(spec)  # pretrained weights are in the model's now, and only on the training machine
    # Rebuilding from the spec checks, before anything is logged, that spec and weights agree.
    packaged = build_from_spec(spec)
    packaged.load_state_dict(weights)
    packaged.eval()
    if input_example is None:
        input_example = np.random.default_rng(0).random((2, *spec["image_shape"]), dtype=np.float32)
    save_file(weights, tmp / "weights.safetensors")
    (tmp / "config.json").write_text(json.dumps(spec, indent=2))
    artifacts = {"config": str(tmp / "config.json"), "weights": str(tmp / "weights.safetensors")}
    if getattr(packaged, "vae", None) is not None:  # aekl: the diffusers folder rides along (models pull --format)
        packaged.load_state_dict(weights)
        artifacts[DIFFUSERS_ARTIFACT] = str(export_diffusers(packaged, tmp / "diffusers", spec.get("latent_stats")))
    return dict(
        python_model=str(MODEL_CODE),
        artifacts=artifacts,
        code_paths=[str(_model_code(tmp / "code"))],
        # Params only: the input's shape depends on the mode (see vae/registry/pyfunc.py), which checks it itself.
        signature=infer_signature(params=PARAMS),
        input_example=np.array(input_example, dtype=np.float32),
        pip_requirements=_requirements(packaged),
        # Every limit written out, even the defaults: MLflow's load-time overrides (load_model's model_config,
        # MLFLOW_PYFUNC_INFERENCE_CONFIG) only replace keys the logged config has.
        model_config=(limits or ServingLimits()).model_dump(),
    )


def log_model(model: nn.Module, spec: dict, run_id: str, input_example: np.ndarray | None = None,
              limits: ServingLimits | None = None, tags: dict[str, str] | None = None, step: int = 0) -> str:
    """Log `model` into run `run_id` as the pyfunc model "model"; return its URI (models:/m-...).

    `input_example` is a float32 batch (N, C, H, W) in [0, 1] for the default mode, reconstruct; by default
    two uniform-noise images. `limits` caps what one request may ask (default `ServingLimits()`: 1,024 samples
    or images, 2**24 pixels, run 256 rows at a time, aekl tiled past 1,024 px a side). `tags` go on the logged
    model, over the ones MLflow reads from this process (e.g. the run's `mlflow.source.name` instead of whatever
    script logs the model). `step` is the training step the weights are from: MLflow links the run's metrics
    logged at that step to the logged model.
    """
    active = mlflow.active_run()
    if active is not None and active.info.run_id != run_id:
        raise ValueError(f"run {active.info.run_id} is active; cannot log the model into run {run_id}")
    with tempfile.TemporaryDirectory() as tmp:
        kwargs = _pyfunc_kwargs(model, spec, Path(tmp), input_example, limits)
        # MLflow only attaches to a run it finds active; a run we start here ends when logging does.
        run = contextlib.nullcontext() if active is not None else mlflow.start_run(run_id=run_id)
        with run:
            info = mlflow.pyfunc.log_model(name="model", tags=tags, step=step, **kwargs)
    return info.model_uri


def save_model(model: nn.Module, spec: dict, path: str | Path, input_example: np.ndarray | None = None,
               limits: ServingLimits | None = None) -> Path:
    """Write the same MLflow model `log_model` logs into the new directory `path`, with no tracking server."""
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.pyfunc.save_model(str(path), **_pyfunc_kwargs(model, spec, Path(tmp), input_example, limits))
    return Path(path)


def load_torch_model(model_uri: str) -> nn.Module:
    """The torch module behind a logged or registered model (e.g. models:/vae-digits@champion), CPU, eval."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        # Artifact paths as the pyfunc flavor recorded them, relative to the model directory.
        artifacts = Model.load(str(local)).flavors["python_function"]["artifacts"]
        spec = json.loads((local / artifacts["config"]["path"]).read_text())
        weights = load_file(local / artifacts["weights"]["path"], device="cpu")
    model = build_from_spec(spec)
    model.load_state_dict(weights)
    return model.eval()
