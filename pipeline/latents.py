"""The latent shard format, version 1: WebDataset tar shards of posteriors plus an `index.json` written last.

`vaepipe encode` (vae/latents) writes it; the loader (`pipeline.open_loader` on a latent directory) reads it as
it reads image shards, and plain webdataset reads it too. One tar sample per image, in the source split's file
order:

- `__key__`: `{split}-{position:09d}` (the image's position in its split; source keys may hold dots and
  slashes, which WebDataset would read as suffixes and folders), `key.txt`: the source's own key;
- `mean.npy`, `std.npy`: the posterior's mean and standard deviation, (C, h, w), unscaled (a diffusion model
  trains on `(mean - shift_factor) * scaling_factor`, both in index.json);
- `cls`: the label, when the split has labels; `txt`: the caption, when the source split has captions
  (`pipeline.read_captions`; webdataset's and img2dataset's name for it); `mean_flip.npy`, `std_flip.npy`: the
  horizontally mirrored image's posterior, when the encode was asked for the twin.

dtype: `float16` by default, `float32`, or `bfloat16`. numpy has no bfloat16, so bf16 is stored as its raw
16 bits in a uint16 .npy and index.json says `bfloat16`: `torch.from_numpy(a).view(torch.bfloat16)` restores
it bit for bit. fp16 is the default because it halves fp32's bytes and every numpy/webdataset reader opens it
as it is; LightningDiT's extract_features.py saves the VAE's fp32 output in safetensors (4 bytes a value).

A reader scans a shard's tar and .npy headers into a `LatentTable` (where each array's bytes lie, and each
sample's key, label and caption), checked against index.json, then reads any sample by offset.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, Field, ValidationError

from pipeline.errors import ShardFormatError
from pipeline.layouts import ShardTable, member_groups
from pipeline.npy import npy_header
from pipeline.shards import INDEX_NAME, ShardInfo
from pipeline.storage import Location

FORMAT_NAME = "vaepipe-latents"
FORMAT_VERSION = 1
LatentDtype = Literal["float16", "bfloat16", "float32"]
# torch dtype of the values, and numpy dtype of their bytes in the .npy
DTYPES: dict[str, tuple[torch.dtype, type]] = {
    "float16": (torch.float16, np.float16), "bfloat16": (torch.bfloat16, np.uint16), "float32": (torch.float32,
                                                                                                  np.float32)}


class LatentSplit(BaseModel):
    num_samples: int
    shards: list[ShardInfo]
    num_classes: int | None = None
    captions: bool = Field(False, description="Whether every sample carries its source caption (`txt`).")

    @property
    def num_factors(self) -> None:
        """Latent shards carry no ground-truth factors (the loader asks every split)."""
        return None


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

    @property
    def fields(self) -> tuple[str, ...]:
        """The arrays each sample holds, in the order a reader stacks them."""
        return ("mean", "std", "mean_flip", "std_flip") if self.flip else ("mean", "std")

    @property
    def array_bytes(self) -> int:
        """Bytes of one stored array (C * h * w values)."""
        return int(np.prod(self.latent_shape)) * np.dtype(DTYPES[self.dtype][1]).itemsize

    def split(self, name: str) -> LatentSplit:
        if name not in self.splits:
            raise ShardFormatError(f"the latent index has no split {name!r}; it has {sorted(self.splits)}")
        return self.splits[name]


def stored(values: torch.Tensor, dtype: LatentDtype) -> np.ndarray:
    """A float tensor (B, C, h, w) as the numpy array the shards hold (bf16: its raw bits as uint16)."""
    torch_dtype, _ = DTYPES[dtype]
    values = values.detach().to("cpu", torch_dtype)
    return values.view(torch.uint16).numpy() if dtype == "bfloat16" else values.numpy()


def restored(array: np.ndarray, dtype: LatentDtype) -> torch.Tensor:
    """A stored array back as a tensor of the values' dtype (the inverse of `stored`)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


def _location(where: str | os.PathLike | Location, storage_options: dict | None = None) -> Location:
    return where if isinstance(where, Location) else Location(where, storage_options)


def write_index(out_dir: str | os.PathLike | Location, index: LatentIndex) -> str:
    """Write index.json whole and last (`Location.write_text`: a rename locally, one PUT on an object store)."""
    location = _location(out_dir)
    location.write_text(INDEX_NAME, index.model_dump_json(indent=2))
    return location.display(INDEX_NAME)


def index_format(where: str | os.PathLike | Location, storage_options: dict | None = None) -> str | None:
    """The `format` index.json names (`vaepipe-shards`, `vaepipe-latents`), or None where there is no readable
    index: then the image reader's own checks say what is wrong."""
    location = _location(where, storage_options)
    try:
        raw = json.loads(location.read_text(INDEX_NAME))
    except (OSError, ValueError):
        return None
    return raw.get("format") if isinstance(raw, dict) else None


def read_index(where: str | os.PathLike | Location, storage_options: dict | None = None) -> LatentIndex:
    """A complete latent directory's index; a directory without one, or with another format's, is refused."""
    location = _location(where, storage_options)
    if not location.isfile(INDEX_NAME):
        raise FileNotFoundError(f"{location} has no {INDEX_NAME}: it is not a complete latent directory (an encode "
                                "was interrupted, or never ran); re-run `vaepipe encode` into it")
    path = location.display(INDEX_NAME)
    try:
        raw = json.loads(location.read_text(INDEX_NAME))
    except json.JSONDecodeError as err:
        raise ShardFormatError(f"{path} is not valid JSON ({err}); re-run `vaepipe encode`") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME or raw.get("version") != FORMAT_VERSION:
        found = (raw.get("format"), raw.get("version")) if isinstance(raw, dict) else (None, None)
        raise ShardFormatError(f"{path}: format {found[0]!r} version {found[1]!r} is not {FORMAT_NAME!r} version "
                               f"{FORMAT_VERSION}; re-run `vaepipe encode` with this vaepipe")
    try:
        return LatentIndex.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ShardFormatError(f"{path} is malformed ({problems}); re-run `vaepipe encode`") from None


@dataclass
class LatentTable(ShardTable):
    """A latent shard's table: `offsets` (n, F) is where each of the sample's F arrays (`LatentIndex.fields`)
    begins, `sizes` (n,) the bytes of one array; keys and captions ride along (a few bytes a sample)."""

    keys: list[str] | None = None
    texts: list[str] | None = None


def scan(f, index: LatentIndex, split: str) -> LatentTable:
    """An open latent shard's table from its tar and .npy headers, each array checked against index.json's dtype
    and shape, and each sample's key, label and caption (when index.json promises them)."""
    info = index.split(split)
    f.seek(0, io.SEEK_END)
    size = f.tell()
    f.seek(0)
    dtype, nbytes = np.dtype(DTYPES[index.dtype][1]), index.array_bytes
    wanted = {f"{name}.npy" for name in index.fields} | {"key.txt"}
    wanted |= ({"cls"} if info.num_classes is not None else set()) | ({"txt"} if info.captions else set())
    offsets, keys, texts, labels = [], [], [], []
    checked: bytes | None = None  # a .npy header parsed and found right (numpy's parser costs ~80 us a call)
    header = 0
    with tarfile.open(fileobj=f, mode="r:") as tar:
        for key, found in member_groups(tar):
            if missing := wanted - set(found):
                raise ShardFormatError(f"holds a sample {key} without {sorted(missing)} (members: {sorted(found)})")
            row = []
            for name in index.fields:
                member = found[f"{name}.npy"]
                f.seek(member.offset_data)
                head = f.read(min(member.size, 1024))
                if checked is None or not head.startswith(checked):  # parsed once: the rest match its bytes
                    shape, got, header = npy_header(head)
                    if np.dtype(got) != dtype or tuple(shape) != tuple(index.latent_shape):
                        raise ShardFormatError(f"holds {key}.{name}.npy of {np.dtype(got)} {tuple(shape)}, but "
                                               f"index.json says {index.dtype} {tuple(index.latent_shape)}")
                    checked = head[:header]
                if member.offset_data + header + nbytes > size:
                    raise ShardFormatError(f"ends inside {key}.{name}.npy at byte {size} (truncated)")
                row.append(member.offset_data + header)
            offsets.append(row)
            keys.append(tar.extractfile(found["key.txt"]).read().decode())
            if "txt" in wanted:
                texts.append(tar.extractfile(found["txt"]).read().decode())
            if "cls" in wanted:
                labels.append(int(tar.extractfile(found["cls"]).read()))
    n = len(offsets)
    return LatentTable(np.asarray(offsets, np.int64).reshape(n, len(index.fields)), np.full(n, nbytes, np.int64),
                       np.asarray(labels, np.int64) if info.num_classes is not None else None, None,
                       keys=keys, texts=texts if info.captions else None)
