"""Registered models for people outside Python: what is there (`list_models`), and one model's files
(`pull_model`), behind `vaepipe models list` and `vaepipe models pull`.

A pulled directory is the MLflow model itself (MLmodel, mlflow_model.py, artifacts/weights.safetensors,
artifacts/config.json, code/vae/...): `mlflow models serve -m DIR` or `mlflow.pyfunc.load_model(DIR)` use it
with no tracking server, and the safetensors and JSON read anywhere.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

from vae.registry.packaging import DIFFUSERS_ARTIFACT
from vae.registry.versions import CHAMPION

# shown by `list`; registry and finalize set them (val_psnr, val_ssim: aekl)
HEADLINE_TAGS = ("val_nll", "val_elbo", "val_bpd", "val_psnr", "val_ssim", "git_commit")


class ModelStoreError(ValueError):
    """A model reference, store or destination that cannot be used; the message says what exists instead."""


@dataclass(frozen=True)
class VersionSummary:
    version: int
    aliases: list[str]
    tags: dict[str, str]  # the HEADLINE_TAGS the version has


@dataclass(frozen=True)
class ModelSummary:
    name: str
    aliases: dict[str, int]  # alias -> version
    versions: list[VersionSummary]  # newest first


def client(tracking_uri: str) -> mlflow.MlflowClient:
    """A client for `tracking_uri`; a sqlite URI must name an existing file (MLflow would create an empty one)."""
    if tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri.removeprefix("sqlite:///"))
        if not path.is_file():
            raise ModelStoreError(f"no MLflow store at {path}: run from the directory holding mlflow.db, or pass "
                                  "--tracking-uri (or set MLFLOW_TRACKING_URI) to your store or server")
    return mlflow.MlflowClient(tracking_uri)


def list_models(tracking_uri: str) -> list[ModelSummary]:
    """Every registered model, by name, with its aliases and its versions' headline tags."""
    mlflow_client = client(tracking_uri)
    models, token = [], None
    while True:  # paged: at most 100 models a page by default
        page = mlflow_client.search_registered_models(order_by=["name ASC"], page_token=token)
        models.extend(page)
        token = page.token
        if not token:
            break
    summaries = []
    for model in models:
        aliases = {alias: int(v) for alias, v in model.aliases.items()}
        by_version: dict[int, list[str]] = {}
        for alias, v in sorted(aliases.items()):
            by_version.setdefault(v, []).append(alias)
        versions = [
            VersionSummary(int(v.version), by_version.get(int(v.version), []),
                           {k: v.tags[k] for k in HEADLINE_TAGS if k in v.tags})
            for v in mlflow_client.search_model_versions(f"name='{model.name}'")
        ]
        summaries.append(ModelSummary(model.name, aliases, sorted(versions, key=lambda s: -s.version)))
    return summaries


def format_table(models: list[ModelSummary]) -> str:
    """One line per model, then one per version: number, aliases, headline tags (metrics to 4 decimals)."""
    lines = []
    for model in models:
        lines.append(f"{model.name}  ({len(model.versions)} version{'' if len(model.versions) == 1 else 's'})")
        for v in model.versions:
            tags = [f"{k}={float(value):.4f}" if k.startswith("val_") else f"{k}={value[:12]}"
                    for k, value in v.tags.items()]
            lines.append(f"  {v.version:>4}  {','.join(v.aliases) or '-':<21} {'  '.join(tags)}".rstrip())
    return "\n".join(lines)


def parse_ref(ref: str) -> tuple[str, str | None, int | None]:
    """'NAME' (its champion), 'NAME@ALIAS' or 'NAME/VERSION' -> (name, alias, version), one of the last two set;
    each also as the URI MLflow's UI shows (models:/NAME@ALIAS, models:/NAME/VERSION)."""
    ref = ref.removeprefix("models:/")
    if "@" in ref:
        name, alias = ref.rsplit("@", 1)
        if name and alias:
            return name, alias, None
    elif "/" in ref:
        name, version = ref.rsplit("/", 1)
        if name and version.isdigit():
            return name, None, int(version)
    elif ref:
        return ref, CHAMPION, None
    raise ModelStoreError(f"bad model reference {ref!r}: use NAME, NAME@ALIAS or NAME/VERSION (e.g. "
                          f"vae-digits@champion, vae-digits/3)")


def resolve(mlflow_client: mlflow.MlflowClient, ref: str) -> tuple[str, int]:
    """(name, version) that `ref` names now; a missing model, alias or version names the ones that exist."""
    name, alias, version = parse_ref(ref)
    try:
        model = mlflow_client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        names = [m.name for m in mlflow_client.search_registered_models()]
        raise ModelStoreError(f"no registered model {name!r}; registered: {', '.join(names) or 'none'} "
                              "(vaepipe models list shows them)") from None
    if alias is not None:
        if alias not in model.aliases:
            valid = ", ".join(f"{a} (version {v})" for a, v in sorted(model.aliases.items())) or "none"
            raise ModelStoreError(f"{name} has no alias {alias!r}; its aliases: {valid}")
        return name, int(model.aliases[alias])
    versions = sorted(int(v.version) for v in mlflow_client.search_model_versions(f"name='{name}'"))
    if version not in versions:
        raise ModelStoreError(f"{name} has no version {version}; its versions: {', '.join(map(str, versions))}")
    return name, version


def pull_model(ref: str, dest_dir: str | os.PathLike, tracking_uri: str) -> tuple[str, int, Path]:
    """Download the model that `ref` names into `dest_dir` (created if missing, refused if not empty);
    return (name, version, dest_dir). An alias is resolved once, so the files are one version's even if the
    alias moves during the download."""
    dest = Path(dest_dir)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ModelStoreError(f"{dest} is not an empty directory; pull into a new or empty one so no files mix")
    mlflow_client = client(tracking_uri)
    name, version = resolve(mlflow_client, ref)
    # The version's own artifact location: a models:/ URI would be resolved through the process-wide
    # registry URI, whatever `tracking_uri` says (MLflow 3.17).
    source = mlflow_client.get_model_version_download_uri(name, str(version))
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Downloaded beside `dest` and renamed into place: a failed download leaves nothing half-written in it.
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.") as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp, tracking_uri=tracking_uri)
        if dest.exists():
            dest.rmdir()  # empty, checked above
        Path(local).rename(dest)
    return name, version, dest


def pull_diffusers(ref: str, dest_dir: str | os.PathLike, tracking_uri: str) -> tuple[str, int, Path]:
    """Like `pull_model`, but write only the version's diffusers folder (config.json +
    diffusion_pytorch_model.safetensors) into `dest_dir`: what `AutoencoderKL.from_pretrained(dest_dir)` loads.
    Only model.arch aekl versions carry one; another is refused naming why."""
    from mlflow.models import Model

    dest = Path(dest_dir)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ModelStoreError(f"{dest} is not an empty directory; pull into a new or empty one so no files mix")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.") as tmp:
        name, version, local = pull_model(ref, Path(tmp) / "model", tracking_uri)
        artifacts = Model.load(str(local)).flavors["python_function"].get("artifacts", {})
        if DIFFUSERS_ARTIFACT not in artifacts:
            raise ModelStoreError(f"{name} version {version} carries no diffusers folder: only model.arch aekl "
                                  "exports one (pull it without --format diffusers for the MLflow model)")
        if dest.exists():
            dest.rmdir()  # empty, checked above
        (local / artifacts[DIFFUSERS_ARTIFACT]["path"]).rename(dest)
    return name, version, dest


MODELS_SCHEME = "models:/"


@contextmanager
def diffusers_source(ref: str, tracking_uri: str | None,
                     prefix: str = "vaepipe-") -> Iterator[tuple[Path, dict[str, Any]]]:
    """For the block: the diffusers folder `ref` names, and where it came from. `models:/NAME@ALIAS` or
    `models:/NAME/VERSION`: the version's folder pulled from `tracking_uri` into a temporary directory (removed
    after), provenance {'uri', 'name', 'version', 'version_uri'}; else a local folder with a config.json,
    provenance {'folder'}. What `vaepipe encode` and `vaepipe evaluate` both take as MODEL."""
    if not ref.startswith(MODELS_SCHEME):
        folder = Path(ref)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{ref} is neither models:/NAME@ALIAS, models:/NAME/VERSION nor a diffusers folder "
                                    "(config.json + diffusion_pytorch_model.safetensors)")
        yield folder, {"folder": str(folder.resolve())}
        return
    if tracking_uri is None:
        raise ValueError(f"{ref} names a registered model: give the MLflow tracking URI that holds it")
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        name, version, folder = pull_diffusers(ref.removeprefix(MODELS_SCHEME), Path(tmp) / "vae", tracking_uri)
        yield folder, {"uri": ref, "name": name, "version": version, "version_uri": f"models:/{name}/{version}"}
