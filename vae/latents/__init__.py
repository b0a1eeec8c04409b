"""Latents out: a shard directory encoded by a registered aekl model or a diffusers folder into latent shards.

- `model`: the encoder (diffusers' `AutoencoderKL`) with its scaling and shift factors and where it came from;
- `encode`: the plan (groups of exact image ranges), a group's encode and resume, and the finalize that writes
  `index.json` last;
- `ranks`: the same on many ranks under Accelerate; `tracking`: the encode as an MLflow run (model version, source
  and latent shards as datasets).

The latent shard format itself (one WebDataset sample per image: mean, std, key, label, caption, an optional
mirrored twin; its `index.json`) is `pipeline.latents`: a shard format, read back by `pipeline.open_loader`.

Owns encoding a dataset into latents. Imports the registry (to pull a registered model's diffusers folder) and
pipeline's public API (the shard index, `open_loader`, `read_captions`) and latent format (`pipeline.latents`);
nothing imports it but the flows and entry points.
"""

from vae.latents.encode import EncodeJob, EncodeOptions, encode_dataset, finalize_encode, plan_encode
from vae.latents.model import Encoder, load_encoder

__all__ = ["EncodeJob", "EncodeOptions", "Encoder", "encode_dataset", "finalize_encode", "load_encoder", "plan_encode"]
