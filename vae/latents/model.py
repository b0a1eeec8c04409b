"""The encoder of an encode: a registered aekl model (`models:/NAME@ALIAS`, `models:/NAME/VERSION`) or a diffusers
folder, loaded as diffusers' own `AutoencoderKL` with its latent statistics and where it came from.

A registered aekl version carries its diffusers folder as an artifact (vae/registry/packaging.py), with the
evaluation's `scaling_factor` and `shift_factor` in its config; a folder brings its own config. Either way the
module that encodes is the one a diffusion pipeline will decode with. `freed_memory_kept` is the forward pass's
memory switch on the CPU: glibc reuses the activations torch frees instead of mapping them afresh each batch.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from vae.registry.store import diffusers_source


@dataclass
class Encoder:
    vae: Any  # diffusers.AutoencoderKL, in eval mode, on the CPU
    provenance: dict[str, Any]  # {'uri', 'name', 'version'} or {'folder'}: what index.json records
    scaling_factor: float
    shift_factor: float
    latents_mean: list[float] | None
    latents_std: list[float] | None

    @property
    def factor(self) -> int:
        """The spatial downsampling factor f: the latent is (C, H / f, W / f)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def _from_folder(folder: str | os.PathLike, provenance: dict[str, Any]) -> Encoder:
    from diffusers import AutoencoderKL  # ~2 s; only an encode needs it

    vae = AutoencoderKL.from_pretrained(str(folder), use_safetensors=True).eval()
    config = vae.config
    return Encoder(vae, provenance, float(config.scaling_factor),
                   float(getattr(config, "shift_factor", None) or 0.0),
                   getattr(config, "latents_mean", None), getattr(config, "latents_std", None))


def load_encoder(model: str, tracking_uri: str | None = None) -> Encoder:
    """`models:/NAME@ALIAS`, `models:/NAME/VERSION` (pulled from `tracking_uri`) or a diffusers folder."""
    with diffusers_source(model, tracking_uri, prefix="vaepipe-encode-") as (folder, provenance):
        return _from_folder(folder, provenance)


# glibc's mallopt parameters (malloc.h) and its defaults, restored after an encode
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536
_holders, _holders_lock = 0, threading.Lock()  # contexts inside freed_memory_kept, across threads


def _glibc() -> ctypes.CDLL | None:
    return ctypes.CDLL("libc.so.6") if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" else None


@contextmanager
def freed_memory_kept() -> Iterator[bool]:
    """While inside, glibc keeps the memory torch frees in its heap, to hand back on the next request, instead of
    returning every large block to the kernel. Yields whether it could (False off glibc: nothing changes).

    Why: glibc maps each allocation over its mmap threshold (at most 32 MiB) afresh and unmaps it on free, so every
    encoder activation of a batch (32 x 32 x 128 x 128 fp32 is 64 MiB) costs page faults and zeroing on each
    forward pass; on a 2-core CPU that was 25-40% of the encode's CPU time (bench/LOG.md, 2026-12-08). PyTorch's CPU
    tuning guide makes the same point with jemalloc/tcmalloc; this is glibc's own switch (mallopt), no preload.
    The process keeps its peak heap while inside; on the way out the defaults come back and the heap is trimmed.
    """
    global _holders
    libc = _glibc()
    if libc is None:
        yield False
        return
    with _holders_lock:  # groups encoding at once in threads: the first in sets, the last out restores
        if _holders == 0:
            libc.mallopt(M_MMAP_MAX, 0)  # every allocation from the heap: nothing mapped, nothing unmapped
            libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # and the heap's freed top kept, not returned
        _holders += 1
    try:
        yield True
    finally:
        with _holders_lock:
            _holders -= 1
            if _holders == 0:
                libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
                libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
                libc.malloc_trim(0)
