"""Latents out: a shard directory encoded by a registered aekl model or a diffusers folder into latent shards.

- `model`: the encoder (diffusers' `AutoencoderKL`) with its scaling and shift factors and where it came from;
- `format`: the latent shard format (one WebDataset sample per image: mean, std, key, label, an optional
  mirrored twin) and its `index.json`;
- `encode`: the plan (groups of exact image ranges), a group's encode and resume, and the finalize that writes
  `index.json` last;
- `ranks`: the same on many ranks under Accelerate; `tracking`: the encode as an MLflow run (model version, source
  and latent shards as datasets).

Owns encoding a dataset into latents. Imports the registry (to pull a registered model's diffusers folder) and
pipeline's public API (the shard index and `open_loader`); nothing imports it but the flows and entry points.
"""

from vae.latents.encode import EncodeJob, EncodeOptions, encode_dataset, finalize_encode, plan_encode
from vae.latents.format import LatentIndex, read_index, restored
from vae.latents.model import Encoder, load_encoder

__all__ = ["EncodeJob", "EncodeOptions", "Encoder", "LatentIndex", "encode_dataset", "finalize_encode", "load_encoder",
           "plan_encode", "read_index", "restored"]
