"""Encode a shard directory into latent shards: plan the groups, encode each, finalize with `index.json` last.

A split of N images is cut into G = ceil(N / samples_per_shard) groups; group g is exactly the images
[g * N // G, (g + 1) * N // G) of the split in file order: what `pipeline.open_loader` gives rank g of G
with pad=False and no shuffle, so every image is encoded exactly once. Each group writes one latent shard
`{split}-{g:06d}.tar` (staged, then moved or uploaded whole) and then a marker `.encode/{split}-{g:06d}.json`; a re-run
keeps a group whose marker has this encode's fingerprint and whose shard still matches its sha256, as the
ingest keeps its groups. Ranks take groups g with g % world_size == rank; rank 0 finalizes once all are done.

SHARD_DIR and OUT_DIR may be local paths or any fsspec URL (s3://bucket/prefix, memory://x), as a shard directory
may (`pipeline.storage`); credentials and endpoints come from the file system's own configuration (for S3 the
AWS_* environment variables, AWS_ENDPOINT_URL among them).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Literal

import torch
import webdataset as wds
from pydantic import BaseModel, Field

import pipeline
from pipeline.latents import LatentDtype, LatentIndex, LatentSplit, stored
from pipeline.latents import write_index as write_latent_index
from pipeline.npy import npy_bytes
from pipeline.shards import INDEX_NAME, sha256_of
from pipeline.shards import ShardInfo as LatentShard
from pipeline.storage import Location
from vae.latents.model import Encoder, freed_memory_kept

MARKERS = ".encode"
STARTED = f"{MARKERS}/started"  # written first: the directory is an encode's, even before a group is done
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


def reusable(out: Location, group: Group, expected: str) -> GroupDone | None:
    """A previous run's finished group, when it is this encode's and its shard is intact."""
    if not out.isfile(group.marker):
        return None
    try:
        done = GroupDone.model_validate_json(out.read_text(group.marker))
    except ValueError:
        return None
    name = done.shard.name
    if done.fingerprint != expected or not out.isfile(name) or sha256_of(out, name)[0] != done.shard.sha256:
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


def _samples(encoder: Encoder, loader, group: Group, keys: list[tuple[str, str | None]], options: EncodeOptions,
             labels_seen: list[int]) -> Iterator[dict]:
    position = group.start
    for batch in loader:
        mean, std = posterior(encoder, batch.images, options)
        twin = posterior(encoder, batch.images.flip(-1), options) if options.flip else None
        arrays = [stored(t, options.dtype) for t in (mean, std, *(twin or ()))]
        for i in range(len(mean)):
            key, caption = keys[position]
            sample = {"__key__": f"{group.split}-{position:09d}", "key.txt": key,
                      "mean.npy": npy_bytes(arrays[0][i]), "std.npy": npy_bytes(arrays[1][i])}
            if caption is not None:
                sample["txt"] = caption
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
def encode_group(encoder: Encoder, shard_dir: str | os.PathLike, out: Location, group: Group,
                 keys: list[tuple[str, str | None]], options: EncodeOptions, expected: str) -> GroupDone:
    """Encode one group into its latent shard (or keep it, when a previous run finished it intact). The shard is
    written to a staging directory (in OUT_DIR when it is local, so the move is a rename), checksummed there and
    then moved or uploaded whole (`Location.put`); the group's marker follows it."""
    if (done := reusable(out, group, expected)) is not None:
        return done
    out.remove(group.marker)
    loader = pipeline.open_loader(shard_dir, group.split, options.batch_size, rank=group.group,
                                  world_size=group.groups, shuffle=False, drop_last=False, pad=False,
                                  crop_size=options.crop_size, crop="centre", workers=options.workers)
    labels: list[int] = []
    heap = freed_memory_kept() if options.keep_freed_memory else nullcontext()
    with tempfile.TemporaryDirectory(prefix=".staging-", dir=out.root if out.local else None) as staging:
        tmp = Location(staging)
        # mtime 0: no clock in the bytes, an encode is reproducible
        with wds.TarWriter(tmp.path(group.shard_name), mtime=0) as writer, heap:
            for sample in _samples(encoder, loader, group, keys, options, labels):
                writer.write(sample)
        digest, size = sha256_of(tmp, group.shard_name)
        out.put(tmp.path(group.shard_name), group.shard_name)
    info = LatentShard(name=group.shard_name, num_samples=group.stop - group.start, bytes=size, sha256=digest)
    done = GroupDone(group=group, fingerprint=expected, shard=info, max_label=max(labels, default=-1))
    out.write_text(group.marker, done.model_dump_json())
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


def check_out_dir(out: Location, overwrite: bool) -> None:
    """An encode writes into a new or empty directory, or one an earlier encode of vaepipe left (to resume)."""
    if out.fs.isfile(out.root):
        raise FileExistsError(f"{out} is a file; give a directory for the latent shards")
    if out.isfile(INDEX_NAME):
        if not overwrite:
            raise FileExistsError(f"{out} already holds a complete latent directory; give a new OUT_DIR or "
                                  "--overwrite to encode it again")
        out.remove(INDEX_NAME)
    elif out.listdir() and MARKERS not in out.listdir():
        raise FileExistsError(f"{out} holds files no encode of vaepipe wrote; give a new or empty OUT_DIR")
    # written before any shard (a file: object stores have no empty directories), so a run killed inside its first
    # group is still known as ours
    out.write_text(STARTED, "")


def finalize_encode(encoder: Encoder, shard_dir: str | os.PathLike, out: Location, index: pipeline.ShardIndex,
                    source_sha: str, options: EncodeOptions) -> LatentIndex:
    """Merge the groups' markers (every planned group must be done), remove shards no group lists, and write
    `index.json` last; the markers go after it."""
    groups = plan_encode(index, options)
    done = [reusable(out, g, fingerprint(encoder, source_sha, options, g)) for g in groups]
    missing = [g.shard_name for g, d in zip(groups, done, strict=True) if d is None]
    if missing:
        raise RuntimeError(f"{len(missing)} latent group(s) are not done ({', '.join(missing[:5])}); re-run the "
                           "encode: finished groups are kept")
    splits = {}
    for split in dict.fromkeys(g.split for g in groups):
        mine = [d for d in done if d.group.split == split]
        top = max(d.max_label for d in mine)
        splits[split] = LatentSplit(num_samples=sum(d.shard.num_samples for d in mine),
                                    shards=[d.shard for d in mine], num_classes=top + 1 if top >= 0 else None,
                                    captions=index.split(split).captions)
    listed = {s.name for info in splits.values() for s in info.shards}
    for stale in out.glob("*.tar"):  # an earlier, differently planned encode into this directory
        if stale not in listed:
            out.remove(stale)
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
    write_latent_index(out, latent)
    out.fs.rm(out.path(MARKERS), recursive=True)
    for staging in out.glob(".staging-*") if out.local else ():  # a killed group's leftovers (SIGKILL: no cleanup)
        out.fs.rm(out.path(staging), recursive=True)
    return latent


@dataclass
class EncodeJob:
    """One encode, prepared: what every group needs. `groups(rank, world_size)` are a rank's, `run(group)` encodes
    one (or keeps it), `finalize()` writes index.json once all are done. The flow runs a task per group."""

    encoder: Encoder
    shard_dir: str | os.PathLike
    out_dir: Location
    options: EncodeOptions
    index: pipeline.ShardIndex
    source_sha: str
    _keys: dict[str, list[tuple[str, str | None]]] = field(default_factory=dict)  # split -> (key, caption)

    @classmethod
    def prepare(cls, encoder: Encoder, shard_dir: str | os.PathLike, out_dir: str | os.PathLike,
                options: EncodeOptions | None = None, overwrite: bool = False, rank: int = 0) -> EncodeJob:
        """Read the source index, check the output directory (rank 0) and the image size; move the encoder to its
        device."""
        options = options or EncodeOptions()
        job = cls(encoder, shard_dir, Location(out_dir), options, pipeline.read_index(shard_dir),
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
            self._keys[group.split] = pipeline.read_captions(self.shard_dir, group.split)
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
