"""Packaging a trained VAE as an MLflow model, registering it, and loading it back as a torch module.

The MLflow model is `vae/mlflow_model.py` logged as code, with the config as JSON and the weights as
safetensors: nothing is pickled. The alias `champion` names the registered version with the best
score under the model's `Criterion`: for the ELBO family the validation NLL (`val/nll_iwae` in nats, lower is
better, tag `val_nll`), for aekl the validation PSNR (`val/psnr` in dB, higher is better, tag `val_psnr`), read
from each version's tag; the newest version holds the alias `challenger`. `register` explains how the aliases
stay right under concurrent runs.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any, NamedTuple

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import Model, infer_signature
from safetensors.torch import load_file, save_file
from torch import nn

from vae.aekl_export import export_diffusers, portable_spec
from vae.mlflow_model import PARAMS, ServingLimits
from vae.spec import build_from_spec, model_spec  # noqa: F401 - the spec's home; imported from here too

PACKAGE_DIR = Path(__file__).resolve().parent
MODEL_CODE = PACKAGE_DIR / "mlflow_model.py"
CHAMPION = "champion"
CHALLENGER = "challenger"
NLL_TAG = "val_nll"
NONFINITE_TAG = "val_nll_nonfinite"  # why a version has no val_nll: its NLL was NaN or infinite; it never competes
ALIAS_ROUNDS = 20  # a round is two reads and any writes; two concurrent registrars settle in two or three
REQUIREMENTS = ("torch", "safetensors", "numpy", "mlflow")
DIFFUSERS_ARTIFACT = "diffusers"  # an aekl model's diffusers folder (config.json + safetensors)


class Criterion(NamedTuple):
    """What makes a version the champion: the metric, the version tag that holds it, and its direction."""

    metric: str  # the val/* name in metrics.json
    tag: str  # the model version tag that carries it (repr of the float)
    higher_is_better: bool

    def best(self, scores: dict[int, float]) -> int:
        """The winning version: the best score, then the lowest version (a tie keeps the earlier one)."""
        sign = -1.0 if self.higher_is_better else 1.0
        return min(scores, key=lambda v: (sign * scores[v], v))


NLL = Criterion("val/nll_iwae", NLL_TAG, higher_is_better=False)
PSNR = Criterion("val/psnr", "val_psnr", higher_is_better=True)
CRITERIA = {c.tag: c for c in (NLL, PSNR)}  # evaluation.json names its criterion by tag


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: int
    uri: str  # models:/<name>/<version>
    champion: bool  # whether this version holds the alias `champion` once the aliases have settled
    previous_champion_nll: float | None  # the champion's score (val_nll by default) before this registration


def _model_code(dst: Path) -> Path:
    """A copy of the `vae` package holding only what the model file imports (the package init and models)."""
    package = dst / "vae"
    shutil.copytree(PACKAGE_DIR / "models", package / "models", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(PACKAGE_DIR / "__init__.py", package / "__init__.py")
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
    spec = portable_spec(spec)  # a pretrained folder is in the weights now, and only on the training machine
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
        # Params only: the input's shape depends on the mode (see vae/mlflow_model.py), which checks it itself.
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
    or images, run 256 rows at a time). `tags` go on the logged model, over the ones MLflow reads from this
    process (e.g. the run's `mlflow.source.name` instead of whatever script logs the model). `step` is the
    training step the weights are from: MLflow links the run's metrics logged at that step to the logged model.
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


def _contest(client: mlflow.MlflowClient, name: str,
             criterion: Criterion = NLL) -> tuple[dict[str, int], dict[int, float]]:
    """The model's aliases {alias: version} and its competing versions {version: score under `criterion`}; both
    empty when the model does not exist yet. Versions without the tag (registered by hand) do not compete."""
    try:
        aliases = {alias: int(v) for alias, v in client.get_registered_model(name).aliases.items()}
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return {}, {}
        raise
    # One query for all versions (paged at 10,000, far beyond what a model accumulates).
    versions = client.search_model_versions(f"name='{name}'")
    nll = {int(v.version): float(v.tags[criterion.tag]) for v in versions if criterion.tag in v.tags}
    if CHAMPION in aliases and aliases[CHAMPION] not in nll:
        held = next(v for v in versions if int(v.version) == aliases[CHAMPION])
        other = [c for c in CRITERIA.values() if c.tag in held.tags and c != criterion]
        if other:  # e.g. an aekl run registering under the name of an ELBO model: the scores do not compare
            raise ValueError(
                f"{name}'s champion, version {aliases[CHAMPION]}, competes on {other[0].metric} (tag "
                f"{other[0].tag!r}), this model on {criterion.metric} (tag {criterion.tag!r}): the two cannot be "
                f"compared; register under another name (--tracking.model_name)")
        raise ValueError(
            f"{name} version {aliases[CHAMPION]} holds the alias {CHAMPION!r} but has no {criterion.tag!r} tag to "
            f"compare against; tag it (MlflowClient().set_model_version_tag({name!r}, '{aliases[CHAMPION]}', "
            f"{criterion.tag!r}, '<{criterion.metric}>')) or move the alias to a tagged version"
        )
    return aliases, nll


def register(model_uri: str, name: str, val_nll: float, run_id: str, tags: dict[str, str] | None = None,
             nonfinite_reason: str | None = None, criterion: Criterion = NLL) -> RegisteredVersion:
    """Register `model_uri` as a new version of `name`, tagged with `val_nll` (nats) and `tags`.

    The new version takes the alias `challenger`; `champion` moves to it only if its validation NLL is
    strictly lower than every other competing version's (a tie keeps the earlier version).

    Another `criterion` (aekl: `PSNR`) makes `val_nll` that criterion's score, under its tag, compared in its
    direction; everything below holds for it alike (read "val_nll" as the criterion's tag).

    A NaN or infinite `val_nll` still registers the version (a trained model is never lost to a bad metric),
    but without the `val_nll` tag, so it does not compete and takes neither alias: it gets the tag
    `val_nll_nonfinite` with `nonfinite_reason` (or the value) instead, and a warning says so.

    MLflow has no transaction over aliases, so a read-compare-set races: two registrars finishing together
    both read the old champion and the last writer wins, even when it is the worse one. Instead each
    registrar creates its version with its tags in one request, then loops: read every version and the
    aliases, compute the targets (champion: lowest val_nll, then lowest version; challenger: the newest
    version), write the aliases that differ, and read again; it returns only after a read that agrees with
    its targets. Why that converges on the right answer: take the last alias write, W. Its registrar read
    again after W and found the aliases agreeing with the targets over every version in that read. A version
    it could not see was created later, so its own registrar read everything after W, found agreement too
    (it would otherwise have written after W), and saw a superset. Versions are only added, and the targets
    are a deterministic function of them, so the final aliases are the targets over all versions, whatever
    the interleaving. With no write at all, the aliases already agreed with every registrar's last read.
    """
    val_nll = float(val_nll)
    client = mlflow.MlflowClient()
    aliases, nll = _contest(client, name, criterion)  # read first: a champion without its tag fails before registering
    previous = nll.get(aliases[CHAMPION]) if CHAMPION in aliases else None
    if not math.isfinite(val_nll):
        why = nonfinite_reason or f"{criterion.metric} is {val_nll}"
        nonfinite_tag = f"{criterion.tag}_nonfinite"  # NONFINITE_TAG for the NLL
        registered = mlflow.register_model(model_uri, name, tags={**(tags or {}), nonfinite_tag: why})
        warnings.warn(f"{name} version {registered.version} is registered without {criterion.tag!r} and takes no "
                      f"alias: {why}", stacklevel=2)
        client.set_tag(run_id, "registered_model_version", f"{name}/{registered.version}")
        client.set_tag(run_id, nonfinite_tag, why)
        return RegisteredVersion(name, int(registered.version), f"models:/{name}/{registered.version}", False,
                                 previous)
    # repr() round-trips a float exactly, so the next comparison sees the same number.
    registered = mlflow.register_model(model_uri, name, tags={**(tags or {}), criterion.tag: repr(val_nll)})
    version = int(registered.version)
    for _ in range(ALIAS_ROUNDS):
        aliases, nll = _contest(client, name, criterion)
        best = criterion.best(nll)
        targets = {CHAMPION: best, CHALLENGER: max(nll)}
        if all(aliases.get(alias) == v for alias, v in targets.items()):
            break
        for alias, v in targets.items():
            if aliases.get(alias) != v:
                client.set_registered_model_alias(name, alias, str(v))
    else:
        raise RuntimeError(f"the aliases of {name} did not settle in {ALIAS_ROUNDS} rounds: other registrations "
                           f"keep moving them; check them by hand (version {version} is registered)")
    client.set_tag(run_id, "registered_model_version", f"{name}/{version}")  # the run page names its version
    return RegisteredVersion(name, version, f"models:/{name}/{version}", aliases[CHAMPION] == version, previous)


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
