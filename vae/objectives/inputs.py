"""What an objective feeds its model: the loaders' uint8 batches as float inputs, per the run's data section.

Owns the pixel transforms that belong to the likelihood (dynamic binarisation, uniform dequantisation) and the
memory format the model's weights were converted to. Imports torch and the config only.
"""

from __future__ import annotations

import torch

from vae.config import RunConfig


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 in [0, 1]."""
    return images.float().div_(255.0)


def to_input(images: torch.Tensor, cfg: RunConfig, memory_format: torch.memory_format | None = None) -> torch.Tensor:
    """uint8 (B, C, H, W) on the device, in either memory format -> float32 model input in `memory_format`; by
    default the run's own (channels-last under train.channels_last), so validation and evaluation feed the model
    the layout its weights were converted to, as training does.

    The loaders hand batches out channels-last in memory (pipeline's `Batch`); the cast makes the model's layout
    in the same pass (on a GPU the reorder costs nothing next to the cast; a planar model input also keeps DDP's
    gradient buckets and the conv weights' gradient strides in agreement).
    Default: intensities in [0, 1]. data.binarize: a fresh Bernoulli draw per pixel on every call, so an
    image seen in ten epochs is ten different binary images (dynamically binarised MNIST, as in the
    literature). data.dequantize: (x + u) / 256 with u ~ U[0, 1) per pixel, a continuous density's input.
    Both draw from torch's global generator on the images' device (seeded by accelerate's set_seed).
    """
    if memory_format is None:
        memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    x = images.to(torch.float32, memory_format=memory_format)
    if cfg.data.binarize:
        return torch.bernoulli(x.div_(255.0))
    if cfg.data.dequantize:
        return x.add_(torch.rand_like(x)).div_(256.0)
    return x.div_(255.0)
