"""Encode a shard directory into latent shards: plan the groups, encode each, finalize with `index.json` last.

A split of N images is cut into G = ceil(N / samples_per_shard) groups; group g is exactly the images
[g * N // G, (g + 1) * N // G) of the split in file order: what `pipeline.open_loader` gives rank g of G
with pad=False and no shuffle, so every image is encoded exactly once. Each group writes one latent shard
`{split}-{g:06d}.tar` (through a temporary name) and then a marker `.encode/{split}-{g:06d}.json`; a re-run
keeps a group whose marker has this encode's fingerprint and whose shard still matches its sha256, as the
ingest keeps its groups. Ranks take groups g with g % world_size == rank; rank 0 finalizes once all are done.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tarfile
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import webdataset as wds
from pydantic import BaseModel, Field

import pipeline
from vae.latents.format import INDEX_NAME, LatentDtype, LatentIndex, LatentShard, LatentSplit, npy_bytes, stored
from vae.latents.format import write_index as write_latent_index
from vae.latents.model import Encoder, freed_memory_kept

MARKERS = ".encode"
Precision = Literal["fp32", "bf16", "fp16"]
SPEED_ONLY = {"batch_size", "device", "workers", "keep_freed_memory"}  # options that never change a latent


class EncodeOptions(BaseModel, frozen=True):
    """How a shard directory is encoded; every field but the last four shapes the latent shards."""

    splits: tuple[str, ...] | None = Field(None, description="Splits to encode; None: every split of the index.")
    dtype: LatentDtype = Field("float16", description="How means and stds are stored (bf16 as raw uint16).")
    flip: bool = Field(False, description="Also encode each image mirrored left-right (mean_flip.npy, std_flip.npy).")
    crop_size: tuple[int, int] | None = Field(None, description="Centre crop (H, W) before encoding; None: whole.")
    samples_per_shard: int = Field(4096, gt=0, description="Images per latent shard (one shard per group).")
    precision: Precision = Field("fp32", description="The encoder's compute precision (autocast for bf16/fp16).")
    batch_size: int = Field(32, gt=0, description="Images per forward pass.")
    device: str = Field("cpu", description="torch device the encoder runs on.")
    workers: int = Field(0, ge=0, description="Loader processes that read and decode the source images.")
    keep_freed_memory: bool = Field(True, description="Let glibc reuse the encoder's freed activations instead of "
                                    "mapping them afresh each batch (`model.freed_memory_kept`; ~1.3x on a CPU).")


class Group(BaseModel, frozen=True):
    split: str
    group: int
    groups: int  # G of the split
    start: int  # first image of the split (file order)
    stop: int

    @property
    def shard_name(self) -> str:
        return f"{self.split}-{self.group:06d}.tar"

    @property
    def marker(self) -> str:
        return f"{MARKERS}/{self.split}-{self.group:06d}.json"


class GroupDone(BaseModel):
    """A finished group: its marker's content."""

    group: Group
    fingerprint: str
    shard: LatentShard
    max_label: int  # -1: no labels
    reused: bool = False


def plan_encode(index: pipeline.ShardIndex, options: EncodeOptions) -> list[Group]:
    """Every group of every split to encode, in order."""
    splits = options.splits or tuple(index.splits)
    groups = []
    for split in splits:
        n = index.split(split).num_samples
        count = math.ceil(n / options.samples_per_shard)
        groups += [Group(split=split, group=g, groups=count, start=g * n // count, stop=(g + 1) * n // count)
                   for g in range(count)]
    return groups


def fingerprint(encoder: Encoder, source_sha: str, options: EncodeOptions, group: Group) -> str:
    """What a group's shard depends on; a marker with another is stale."""
    shaping = options.model_dump(mode="json", exclude=SPEED_ONLY)
    data = {"model": encoder.provenance, "config": dict(encoder.vae.config), "source": source_sha,
            "options": shaping, "group": group.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def source_keys(shard_dir: str | os.PathLike, index: pipeline.ShardIndex, split: str) -> list[str]:
    """The split's source keys in file order, from the shards' `keys.json` (block layouts) or `key.txt`
    (one image per sample) members: the documented shard format, read with headers and these members only."""
    keys: list[str] = []
    for shard in index.split(split).shards:
        with tarfile.open(Path(shard_dir) / shard.name, mode="r:") as tar:
            for member in tar:
                if member.name.endswith(".keys.json"):
                    keys += json.loads(tar.extractfile(member).read())
                elif member.name.endswith(".key.txt"):
                    keys.append(tar.extractfile(member).read().decode())
    if len(keys) != index.split(split).num_samples:
        raise pipeline.ShardFormatError(f"{shard_dir}: split {split!r} has {len(keys)} keys for "
                                        f"{index.split(split).num_samples} images; re-run the ingest")
    return keys


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def reusable(out_dir: Path, group: Group, expected: str) -> GroupDone | None:
    """A previous run's finished group, when it is this encode's and its shard is intact."""
    marker = out_dir / group.marker
    if not marker.is_file():
        return None
    try:
        done = GroupDone.model_validate_json(marker.read_text())
    except ValueError:
        return None
    shard = out_dir / done.shard.name
    if done.fingerprint != expected or not shard.is_file() or _sha256(shard) != done.shard.sha256:
        return None
    return done.model_copy(update={"reused": True})


def posterior(encoder: Encoder, images: torch.Tensor, options: EncodeOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (B, C, H, W) -> the posterior's mean and std (B, C', H / f, W / f), float32."""
    device = torch.device(options.device)
    x = images.to(device, non_blocking=True).float().div_(127.5).sub_(1)  # [0, 255] -> diffusers' [-1, 1]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(options.precision)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        dist = encoder.vae.encode(x).latent_dist
    return dist.mean.float(), dist.std.float()


def _samples(encoder: Encoder, loader, group: Group, keys: list[str], options: EncodeOptions,
             labels_seen: list[int]) -> Iterator[dict]:
    position = group.start
    for batch in loader:
        mean, std = posterior(encoder, batch.images, options)
        twin = posterior(encoder, batch.images.flip(-1), options) if options.flip else None
        arrays = [stored(t, options.dtype) for t in (mean, std, *(twin or ()))]
        for i in range(len(mean)):
            sample = {"__key__": f"{group.split}-{position:09d}", "key.txt": keys[position],
                      "mean.npy": npy_bytes(arrays[0][i]), "std.npy": npy_bytes(arrays[1][i])}
            if twin is not None:
                sample["mean_flip.npy"], sample["std_flip.npy"] = npy_bytes(arrays[2][i]), npy_bytes(arrays[3][i])
            if batch.labels is not None:
                label = int(batch.labels[i])
                sample["cls"] = str(label)
                labels_seen.append(label)
            position += 1
            yield sample
    if position != group.stop:
        raise RuntimeError(f"group {group.split}/{group.group} read {position - group.start} images, planned "
                           f"{group.stop - group.start}")


@torch.inference_mode()
def encode_group(encoder: Encoder, shard_dir: str | os.PathLike, out_dir: str | os.PathLike, group: Group,
                 keys: list[str], options: EncodeOptions, expected: str) -> GroupDone:
    """Encode one group into its latent shard (or keep it, when a previous run finished it intact)."""
    out_dir = Path(out_dir)
    if (done := reusable(out_dir, group, expected)) is not None:
        return done
    (out_dir / group.marker).unlink(missing_ok=True)
    loader = pipeline.open_loader(shard_dir, group.split, options.batch_size, rank=group.group,
                                  world_size=group.groups, shuffle=False, drop_last=False, pad=False,
                                  crop_size=options.crop_size, crop="centre", workers=options.workers)
    tmp = out_dir / f".{group.shard_name}.tmp"
    labels: list[int] = []
    heap = freed_memory_kept() if options.keep_freed_memory else nullcontext()
    with wds.TarWriter(str(tmp), mtime=0) as writer, heap:  # mtime 0: no clock in the bytes, an encode is reproducible
        for sample in _samples(encoder, loader, group, keys, options, labels):
            writer.write(sample)
    shard = out_dir / group.shard_name
    os.replace(tmp, shard)
    info = LatentShard(name=group.shard_name, num_samples=group.stop - group.start, bytes=shard.stat().st_size,
                       sha256=_sha256(shard))
    done = GroupDone(group=group, fingerprint=expected, shard=info, max_label=max(labels, default=-1))
    marker_tmp = out_dir / f"{group.marker}.tmp"
    marker_tmp.write_text(done.model_dump_json())
    os.replace(marker_tmp, out_dir / group.marker)
    return done


def latent_shape(encoder: Encoder, index: pipeline.ShardIndex, options: EncodeOptions) -> tuple[int, int, int]:
    h, w, c = index.image_shape
    if c != encoder.vae.config.in_channels:
        raise ValueError(f"the shards hold {c}-channel images, the model encodes {encoder.vae.config.in_channels}")
    h, w = options.crop_size or (h, w)
    f = encoder.factor
    if h % f or w % f:
        raise ValueError(f"images of {h}x{w} px do not divide by the model's downsampling factor {f}; set a crop "
                         "size that does (--crop-size)")
    return int(encoder.vae.config.latent_channels), h // f, w // f


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """An encode writes into a new or empty directory, or one an earlier encode of vaepipe left (to resume)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} is a file; give a directory for the latent shards")
    if (out_dir / INDEX_NAME).is_file():
        if not overwrite:
            raise FileExistsError(f"{out_dir} already holds a complete latent directory; give a new OUT_DIR or "
                                  "--overwrite to encode it again")
        (out_dir / INDEX_NAME).unlink()
    elif out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MARKERS).is_dir():
        raise FileExistsError(f"{out_dir} holds files no encode of vaepipe wrote; give a new or empty OUT_DIR")
    # made before any shard is written: a run killed inside its first group is still known as ours
    (out_dir / MARKERS).mkdir(parents=True, exist_ok=True)


def finalize_encode(encoder: Encoder, shard_dir: str | os.PathLike, out_dir: str | os.PathLike,
                    index: pipeline.ShardIndex, source_sha: str, options: EncodeOptions) -> LatentIndex:
    """Merge the groups' markers (every planned group must be done), remove shards no group lists, and write
    `index.json` last; the markers go after it."""
    out_dir = Path(out_dir)
    groups = plan_encode(index, options)
    done = [reusable(out_dir, g, fingerprint(encoder, source_sha, options, g)) for g in groups]
    missing = [g.shard_name for g, d in zip(groups, done, strict=True) if d is None]
    if missing:
        raise RuntimeError(f"{len(missing)} latent group(s) are not done ({', '.join(missing[:5])}); re-run the "
                           "encode: finished groups are kept")
    splits = {}
    for split in dict.fromkeys(g.split for g in groups):
        mine = [d for d in done if d.group.split == split]
        top = max(d.max_label for d in mine)
        splits[split] = LatentSplit(num_samples=sum(d.shard.num_samples for d in mine),
                                    shards=[d.shard for d in mine], num_classes=top + 1 if top >= 0 else None)
    listed = {s.name for info in splits.values() for s in info.shards}
    for stale in out_dir.glob("*.tar"):  # an earlier, differently planned encode into this directory
        if stale.name not in listed:
            stale.unlink()
    crop = options.crop_size
    latent = LatentIndex(
        model=encoder.provenance,
        source={"shard_dir": str(shard_dir), "index_sha256": source_sha, "layout": index.layout,
                "image_shape": list(index.image_shape)},
        dtype=options.dtype, latent_shape=latent_shape(encoder, index, options),
        scaling_factor=encoder.scaling_factor, shift_factor=encoder.shift_factor,
        latents_mean=encoder.latents_mean, latents_std=encoder.latents_std,
        transform={"resize": "none: the images as the ingest conformed them",
                   "crop": f"centre {crop[0]}x{crop[1]}" if crop else "none: whole image",
                   "pixels": "uint8 / 127.5 - 1 (diffusers' [-1, 1])", "precision": options.precision},
        flip=options.flip, splits=splits,
    )
    write_latent_index(out_dir, latent)
    for marker in (out_dir / MARKERS).glob("*"):
        marker.unlink()
    (out_dir / MARKERS).rmdir()
    return latent


@dataclass
class EncodeJob:
    """One encode, prepared: what every group needs. `groups(rank, world_size)` are a rank's, `run(group)` encodes
    one (or keeps it), `finalize()` writes index.json once all are done. The flow runs a task per group."""

    encoder: Encoder
    shard_dir: str | os.PathLike
    out_dir: Path
    options: EncodeOptions
    index: pipeline.ShardIndex
    source_sha: str
    _keys: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def prepare(cls, encoder: Encoder, shard_dir: str | os.PathLike, out_dir: str | os.PathLike,
                options: EncodeOptions | None = None, overwrite: bool = False, rank: int = 0) -> EncodeJob:
        """Read the source index, check the output directory (rank 0) and the image size; move the encoder to its
        device."""
        options = options or EncodeOptions()
        job = cls(encoder, shard_dir, Path(out_dir), options, pipeline.read_index(shard_dir),
                  pipeline.index_sha256(shard_dir))
        if rank == 0:
            check_out_dir(job.out_dir, overwrite)
        latent_shape(encoder, job.index, options)  # refuse an indivisible size before any work
        encoder.vae.to(options.device)
        return job

    def groups(self, rank: int = 0, world_size: int = 1) -> list[Group]:
        return plan_encode(self.index, self.options)[rank::world_size]

    def run(self, group: Group) -> GroupDone:
        if group.split not in self._keys:
            self._keys[group.split] = source_keys(self.shard_dir, self.index, group.split)
        return encode_group(self.encoder, self.shard_dir, self.out_dir, group, self._keys[group.split], self.options,
                            fingerprint(self.encoder, self.source_sha, self.options, group))

    def finalize(self) -> LatentIndex:
        return finalize_encode(self.encoder, self.shard_dir, self.out_dir, self.index, self.source_sha, self.options)


def encode_dataset(encoder: Encoder, shard_dir: str | os.PathLike, out_dir: str | os.PathLike,
                   options: EncodeOptions | None = None, *, rank: int = 0, world_size: int = 1,
                   overwrite: bool = False, finalize: bool = True) -> LatentIndex | None:
    """Encode this rank's groups of `shard_dir` into `out_dir`; with finalize (one rank, or rank 0 after all
    ranks are done) write index.json. Returns the index, or None when not finalized."""
    job = EncodeJob.prepare(encoder, shard_dir, out_dir, options, overwrite, rank)
    for group in job.groups(rank, world_size):
        job.run(group)
    return job.finalize() if finalize else None
