"""The latent shard format, version 1: WebDataset tar shards of posteriors plus an `index.json` written last.

One tar sample per image, in the source split's file order:

- `__key__`: `{split}-{position:09d}` (the image's position in its split; source keys may hold dots and
  slashes, which WebDataset would read as suffixes and folders), `key.txt`: the source's own key;
- `mean.npy`, `std.npy`: the posterior's mean and standard deviation, (C, h, w), unscaled (a diffusion model
  trains on `(mean - shift_factor) * scaling_factor`, both in index.json);
- `cls`: the label, when the split has labels; `mean_flip.npy`, `std_flip.npy`: the horizontally mirrored
  image's posterior, when the encode was asked for the twin.

dtype: `float16` by default, `float32`, or `bfloat16`. numpy has no bfloat16, so bf16 is stored as its raw
16 bits in a uint16 .npy and index.json says `bfloat16`: `torch.from_numpy(a).view(torch.bfloat16)` restores
it bit for bit. fp16 is the default because it halves fp32's bytes and every numpy/webdataset reader opens it
as it is; LightningDiT's extract_features.py saves the VAE's fp32 output in safetensors (4 bytes a value).
"""

from __future__ import annotations

import io
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, Field

FORMAT_NAME = "vaepipe-latents"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
LatentDtype = Literal["float16", "bfloat16", "float32"]
# torch dtype of the values, and numpy dtype of their bytes in the .npy
DTYPES: dict[str, tuple[torch.dtype, type]] = {
    "float16": (torch.float16, np.float16), "bfloat16": (torch.bfloat16, np.uint16), "float32": (torch.float32,
                                                                                                  np.float32)}


class LatentShard(BaseModel):
    name: str
    num_samples: int
    bytes: int
    sha256: str


class LatentSplit(BaseModel):
    num_samples: int
    shards: list[LatentShard]
    num_classes: int | None = None


class LatentIndex(BaseModel):
    """The content of a latent directory's `index.json`; its presence marks the directory complete."""

    format: Literal["vaepipe-latents"] = FORMAT_NAME
    version: int = FORMAT_VERSION
    created: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    model: dict[str, Any] = Field(description="{'uri', 'name', 'version'} of a registered model, or {'folder'}.")
    source: dict[str, Any] = Field(description="{'shard_dir', 'index_sha256', 'layout'} of the encoded images.")
    dtype: LatentDtype
    latent_shape: tuple[int, int, int] = Field(description="(C, h, w) of each mean and std.")
    scaling_factor: float
    shift_factor: float
    latents_mean: list[float] | None = None
    latents_std: list[float] | None = None
    transform: dict[str, Any] = Field(description="What was done to the pixels before the encoder.")
    flip: bool = Field(description="Whether each sample carries its mirrored twin (mean_flip.npy, std_flip.npy).")
    posterior: str = "diag-gaussian: mean and std of q(z|x); sample z = mean + std * eps"
    splits: dict[str, LatentSplit]


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def stored(values: torch.Tensor, dtype: LatentDtype) -> np.ndarray:
    """A float tensor (B, C, h, w) as the numpy array the shards hold (bf16: its raw bits as uint16)."""
    torch_dtype, _ = DTYPES[dtype]
    values = values.detach().to("cpu", torch_dtype)
    return values.view(torch.uint16).numpy() if dtype == "bfloat16" else values.numpy()


def restored(array: np.ndarray, dtype: LatentDtype) -> torch.Tensor:
    """A stored array back as a tensor of the values' dtype (the inverse of `stored`)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


def write_index(out_dir: str | os.PathLike, index: LatentIndex) -> Path:
    """Write index.json whole and last: a temporary name, then a rename (atomic on one file system)."""
    path = Path(out_dir) / INDEX_NAME
    tmp = path.with_name(f".{INDEX_NAME}.tmp")
    tmp.write_text(index.model_dump_json(indent=2))
    os.replace(tmp, path)
    return path


def read_index(out_dir: str | os.PathLike) -> LatentIndex:
    """A complete latent directory's index; a directory without one is refused."""
    path = Path(out_dir) / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{out_dir} has no {INDEX_NAME}: it is not a complete latent directory (an encode "
                                "was interrupted, or never ran); re-run `vaepipe encode` into it")
    return LatentIndex.model_validate_json(path.read_text())
