"""Pretrained VAEs in the forms people download them, built here from a small random diffusers `AutoencoderKL`:
its state dict in the original LDM / BFL key layout (the inverse of diffusers' `convert_ldm_vae_checkpoint`, in
diffusers/loaders/single_file_utils.py), and a Hugging Face cache holding a repo, laid out as huggingface_hub lays
it out (models--ORG--NAME/{refs/main, snapshots/COMMIT/..., blobs/SHA}) so nothing comes from the network."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import torch

# diffusers name -> original name, applied in this order to the key of one tensor
ATTENTION = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}


def to_original(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in the original LDM names (taming-transformers' `Encoder`/`Decoder`,
    which FLUX's `ae.safetensors` keeps): levels `down.N.block.M`, `up.N` numbered from the lowest resolution the
    other way round, `mid.block_1/attn_1/block_2`, `nin_shortcut`, and the attention's 1x1 convolutions as 4-D
    weights."""
    out = {}
    for key, value in state.items():
        new = key.replace("conv_norm_out.", "norm_out.").replace("conv_shortcut.", "nin_shortcut.")
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.",
                     lambda m: f"decoder.up.{levels - 1 - int(m[1])}."
                               f"{'block' if m[2] == 'resnets' else 'upsample'}.", new)
        new = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", new)
        if "mid_block.attentions.0." in new:
            new = new.replace("mid_block.attentions.0.", "mid.attn_1.")
            for old, original in ATTENTION.items():
                new = new.replace(old, original)
            if value.ndim == 2:  # the original attention is 1x1 convolutions
                value = value[:, :, None, None]
        out[new] = value.contiguous()
    return out


def hf_cache(cache: Path, repo: str, files: dict[str, Path]) -> Path:
    """Put `files` (path in the repo -> local file) into the Hugging Face cache at `cache` as repo `repo`'s main
    revision: blobs by content hash, the snapshot's files linking to them, refs/main naming the commit. Returns the
    snapshot folder."""
    storage = cache / ("models--" + repo.replace("/", "--"))
    commit = hashlib.sha1(repo.encode()).hexdigest()
    snapshot = storage / "snapshots" / commit
    for name, source in files.items():
        data = source.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, blob)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * (len(Path(name).parts) + 1), "blobs", blob.name))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(commit)
    return snapshot
