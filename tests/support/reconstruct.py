"""A diffusers folder loaded by diffusers alone, in a fresh interpreter that never imported vaepipe: what a
latent-diffusion pipeline downstream does with an exported VAE."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

RECONSTRUCT = """
import sys, numpy as np, torch
from diffusers import AutoencoderKL
vae = AutoencoderKL.from_pretrained(sys.argv[1]).eval()
x = torch.from_numpy(np.load(sys.argv[2]))
with torch.no_grad():
    out = vae.decode(vae.encode(x * 2 - 1).latent_dist.mean).sample
np.save(sys.argv[3], ((out + 1) / 2).clamp(0, 1).numpy())
"""


def reconstruct_elsewhere(folder: Path, x: np.ndarray, tmp_path: Path) -> np.ndarray:
    """`x` (N, 3, H, W) in [0, 1] through the folder's encoder mean and decoder, in another process."""
    np.save(tmp_path / "x.npy", x)
    subprocess.run([sys.executable, "-c", RECONSTRUCT, str(folder), str(tmp_path / "x.npy"),
                    str(tmp_path / "out.npy")], check=True, timeout=300)
    return np.load(tmp_path / "out.npy")
