"""The registry of architectures: a plain dict from `model.arch` to class, loud on unknown and duplicate names. The
built-in architectures are registered at the bottom; a plugin calls `register_model(name)` on its class."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from vae.models.aekl import AEKL
from vae.models.conv import ConvVAE
from vae.models.hvae import HierarchicalVAE
from vae.models.mlp import MLPVAE
from vae.models.options import SECTIONS, ArchOptions
from vae.models.resnet import ResNetVAE

MODELS: dict[str, type[nn.Module]] = {}  # model.arch -> its class; its options section is SECTIONS[arch]


def register_model(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make a model available as model.arch `name`, with its `Options` section (the typed
    options its constructor takes, vae/models/options.py); a second model under the same name raises."""
    def add(cls: type[nn.Module]) -> type[nn.Module]:
        if name in MODELS:
            raise ValueError(f"model {name!r} is registered twice ({MODELS[name].__qualname__}, {cls.__qualname__})")
        if SECTIONS.get(name) is None or getattr(cls, "Options", None) is not SECTIONS[name]:
            raise ValueError(f"model {name!r} ({cls.__qualname__}) must declare `Options = SECTIONS[{name!r}]`, its "
                             "section in vae/models/options.py (the run config reads the sections without torch)")
        MODELS[name] = cls
        return cls

    return add


def build_model(arch: str, image_shape: tuple[int, int, int], latent_dim: int, **options) -> nn.Module:
    """Instantiate `arch` for images of shape (C, H, W); a size the architecture cannot take raises ValueError."""
    if arch not in MODELS:
        raise ValueError(f"unknown model architecture {arch!r}; valid: {', '.join(sorted(MODELS))}")
    return MODELS[arch](image_shape=tuple(image_shape), latent_dim=latent_dim, **options)


def resolve_options(options: ArchOptions) -> ArchOptions:
    """`options` with what they leave to files filled in by their architecture (aekl: a pretrained model's
    architecture); called where the model is built, never during validation, which reads no disk."""
    return MODELS[options.arch].resolve_options(options)


register_model("aekl")(AEKL)
register_model("conv")(ConvVAE)
register_model("hvae")(HierarchicalVAE)
register_model("mlp")(MLPVAE)
register_model("resnet")(ResNetVAE)
