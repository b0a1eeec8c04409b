"""rFID's parts: torchmetrics' FrechetInceptionDistance on torch-fidelity's Inception (read without pickle), what it
is called in a protocol, and the real images' statistics cached on disk.

The reference (real-image) statistics depend on the data and the feature extractor only, not on the model, so
`vaepipe evaluate` computes them once per (shard index digest, split, count, resolution, crop, extractor) and keeps
them as safetensors (`reference_file`); a later evaluation of another model on the same images loads the cached
sums into the metric's own states (`real_features_sum`, `real_features_cov_sum`, `real_features_num_samples`) and
torchmetrics computes the distance as it always does.
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import version
from pathlib import Path
from unittest import mock

import torch
from safetensors.torch import load_file, save_file

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID Inception (the TF port)
REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


def inception_weights_path(path: str | Path | None) -> Path | None:
    """The FID Inception weights: the given file, else torch-fidelity's file in the torch hub cache, else None."""
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"Inception weights {str(path)!r} do not exist: give torch-fidelity's "
                                    f"{INCEPTION_FILE} (or a .safetensors of it)")
        return Path(path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    return cached if cached.is_file() else None


def build_fid(weights: Path):
    """torchmetrics' FID on torch-fidelity's Inception, its weights read without pickle.

    torch-fidelity reads a weights file with torch.load(weights_only=False) (pickle: a planted file would run
    code) and otherwise downloads; it offers no other way in, so its loader is replaced, for this construction
    only, by one returning the state dict we read as safetensors or with weights_only=True.
    """
    import torch_fidelity.feature_extractor_inceptionv3 as inception
    from torchmetrics.image.fid import FrechetInceptionDistance

    if weights.suffix == ".safetensors":
        state = load_file(weights)
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    with mock.patch.object(inception, "load_state_dict_from_url", lambda *args, **kwargs: state):
        return FrechetInceptionDistance(feature=2048, normalize=True)


def file_sha256(path: Path) -> str:
    """sha256 of a weights file, read in 1 MiB blocks (a protocol names its weights by it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fid_description(weights: Path) -> str:
    """The FID implementation and its feature extractor, with the weights' sha256 (a protocol field)."""
    sha = file_sha256(weights)
    return (f"torchmetrics {version('torchmetrics')} FrechetInceptionDistance(feature=2048) on torch-fidelity "
            f"{version('torch-fidelity')} inception-v3-compat, weights {weights.name} sha256 {sha[:16]}")


def reference_file(cache_dir: Path, key: dict) -> Path:
    """Where the real images' statistics for `key` (the protocol fields they depend on) are cached."""
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return Path(cache_dir) / f"fid-reference-{name}.safetensors"


def load_reference(fid, path: Path) -> bool:
    """Put the cached real statistics at `path` into `fid`'s states; False when there are none yet."""
    if not path.is_file():
        return False
    state = load_file(path)
    for name in REAL_STATES:
        current = getattr(fid, name)
        if state[name].shape != current.shape:
            raise ValueError(f"{path} holds {name} of shape {tuple(state[name].shape)}, the FID expects "
                             f"{tuple(current.shape)}: delete the file and evaluate again")
        setattr(fid, name, state[name].to(current.device, current.dtype))
    return True


def save_reference(fid, path: Path, key: dict) -> None:
    """Cache `fid`'s real statistics at `path` (written beside it and renamed: never half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    save_file({name: getattr(fid, name).detach().cpu().contiguous() for name in REAL_STATES}, tmp,
              metadata={"key": json.dumps(key, sort_keys=True)})
    tmp.replace(path)
