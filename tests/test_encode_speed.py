"""The encode's speed switches change no latent: `keep_freed_memory` (glibc keeps freed activations in its heap)
gives byte-identical latent shards and the same resume fingerprint, serves a large tensor from the heap while on,
and gives glibc's mapping back when the last encode inside leaves, also when it fails (probed in a fresh
interpreter, whose heap has no history)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_encode import SPEC, STATS
from test_photo_loader import photo_tree

import pipeline
from vae.latents import EncodeOptions, encode_dataset, load_encoder
from vae.latents.encode import fingerprint, plan_encode
from vae.models.spec import build_from_spec
from vae.registry.diffusers import export_diffusers

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
REPO = Path(__file__).resolve().parents[1]
# A fresh interpreter runs the probes: glibc serves a request from any free heap block first, so in a process with a
# history (the tests before) a large probe can land in an old free block and tell nothing. INSIDE (256 MiB) is over
# glibc's largest mmap threshold (32 MiB): mapped unless the switch is on; AFTER (512 MiB) is larger than any block
# the probes freed inside, so only a mapping can serve it once the switch is off.
PROBES = """
import ctypes, json, torch
from vae.latents.model import freed_memory_kept

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
INSIDE, AFTER = 256 << 20, 512 << 20

def mapped(nbytes):  # bytes glibc maps to hold a tensor of nbytes
    before = libc.mallinfo2().hblkhd
    x = torch.empty(nbytes, dtype=torch.uint8)
    during = libc.mallinfo2().hblkhd
    del x
    return during - before

seen = {}
"""


def probe(body: str) -> dict:
    """Run PROBES + body (which fills `seen`) in a fresh interpreter; return `seen`."""
    script = PROBES + textwrap.dedent(body) + "\nprint(json.dumps(seen))\n"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt: elsewhere the switch is a no-op")
def test_freed_memory_kept_serves_a_large_tensor_from_the_heap_and_maps_again_after_an_error():
    seen = probe("""
        seen["before"] = mapped(INSIDE)
        with freed_memory_kept() as active:
            seen["active"], seen["inside"] = active, mapped(INSIDE)
        seen["after"] = mapped(AFTER)
        try:
            with freed_memory_kept():
                raise RuntimeError("a failure inside the encode")
        except RuntimeError:
            seen["after_error"] = mapped(AFTER)
    """)
    mib = 1 << 20
    assert seen["before"] >= 256 * mib  # glibc's default: mapped, and unmapped on free
    assert seen["active"] and seen["inside"] == 0
    assert seen["after"] >= 512 * mib and seen["after_error"] >= 512 * mib  # defaults back, on the error path too


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt: elsewhere the switch is a no-op")
def test_two_groups_at_once_keep_the_heap_until_the_last_one_leaves():
    seen = probe("""
        with freed_memory_kept():
            with freed_memory_kept():  # a second group, as a thread of the same process would enter it
                pass
            seen["first_still_inside"] = mapped(INSIDE)
        seen["after"] = mapped(AFTER)
    """)
    assert seen["first_still_inside"] == 0  # the first group is still encoding: the switch stays on
    assert seen["after"] >= 512 << 20


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
