"""The encode's speed switches change no latent: `keep_freed_memory` (glibc keeps freed activations in its heap)
gives byte-identical latent shards and the same resume fingerprint, serves a large tensor from the heap while on,
and gives glibc's mapping back when the last encode inside leaves, also when it fails."""

from __future__ import annotations

import ctypes
import hashlib
import platform
from pathlib import Path

import pytest
import torch
from test_encode import SPEC, STATS
from test_photo_loader import photo_tree

import pipeline
from vae.latents import EncodeOptions, encode_dataset, load_encoder
from vae.latents.encode import fingerprint, plan_encode
from vae.latents.model import freed_memory_kept
from vae.models.spec import build_from_spec
from vae.registry.diffusers import export_diffusers

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
# bytes: over glibc's largest mmap threshold (32 MiB), so mapped unless the switch is on, and larger than any free
# block the heap may hold (glibc serves a request from free heap memory first, mapped or not)
LARGER = 256 << 20


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def mapped_bytes_while_holding(nbytes: int) -> int:
    """Bytes glibc holds in mmapped blocks while a tensor of `nbytes` is alive, less those before it."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    before = libc.mallinfo2().hblkhd
    x = torch.empty(nbytes, dtype=torch.uint8)
    during = libc.mallinfo2().hblkhd
    del x
    return during - before


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt: elsewhere the switch is a no-op")
def test_freed_memory_kept_serves_a_large_tensor_from_the_heap_and_maps_again_after_an_error():
    assert mapped_bytes_while_holding(LARGER) >= LARGER  # glibc's default: mapped, and unmapped on free
    with freed_memory_kept() as active:
        assert active
        assert mapped_bytes_while_holding(LARGER) == 0
    assert mapped_bytes_while_holding(LARGER) >= LARGER
    with pytest.raises(RuntimeError, match="inside"), freed_memory_kept():
        raise RuntimeError("a failure inside the encode")
    assert mapped_bytes_while_holding(LARGER) >= LARGER  # the defaults came back on the error path too


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt: elsewhere the switch is a no-op")
def test_two_groups_at_once_keep_the_heap_until_the_last_one_leaves():
    with freed_memory_kept():
        with freed_memory_kept():  # a second group, as a thread of the same process would enter it
            pass
        assert mapped_bytes_while_holding(LARGER) == 0  # the first group is still encoding: the switch stays on
    assert mapped_bytes_while_holding(LARGER) >= LARGER


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return export_diffusers(build_from_spec(SPEC).eval(), tmp_path_factory.mktemp("vae") / "vae", STATS)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    tree = photo_tree(tmp_path_factory.mktemp("photos") / "tree", 16)
    out = tree.parent / "shards"
    pipeline.ingest("imagefolder", {"root": str(tree)}, out, progress=False)
    return out


def shard_digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


def test_keeping_freed_memory_changes_no_latent_byte_nor_the_resume_fingerprint(folder, shards, tmp_path):
    encoder = load_encoder(str(folder))
    kept, mapped = (EncodeOptions(samples_per_shard=5, batch_size=4, flip=True, keep_freed_memory=keep)
                    for keep in (True, False))
    encode_dataset(encoder, shards, tmp_path / "kept", kept)
    encode_dataset(encoder, shards, tmp_path / "mapped", mapped)
    digests = shard_digests(tmp_path / "kept")
    assert len(digests) == 4 and digests == shard_digests(tmp_path / "mapped")  # 12 train + 4 test images
    sha = pipeline.index_sha256(shards)
    group = plan_encode(pipeline.read_index(shards), kept)[0]
    assert fingerprint(encoder, sha, kept, group) == fingerprint(encoder, sha, mapped, group)
