"""Model registry and the contract every architecture keeps.

A registry is a plain dict from architecture name to class, with loud failures on unknown or duplicate
names. Model files are single-device code returning a `VAEOutput`; they import nothing of training,
tracking, orchestration or the data pipeline (a test guards that). Each model class carries its `Options`, the
typed section of its constructor's options that the run config uses (vae/models/options.py).

Owns: the architectures, their option sections, the output contract, the spec a model is rebuilt from
(vae/models/spec.py), and aekl's starting weights in the forms people have them (vae/models/pretrained.py).
Never imports another vaepipe package: a logged MLflow model carries a copy of this folder as its code, and loads
where vaepipe is not installed.

The contract, the same for one latent layer or a hierarchy of groups:

- `forward(x, samples=k)` -> `VAEOutput`: the decoder's per-pixel parameters of p(x|z) and, per latent group,
  the sample z with its posterior q and prior p (diagonal Gaussians). Batch is sample-major, k * B rows,
  row s * B + b holding sample s of image b, so k importance samples cost one forward.
- `encode(x) -> (mu, logvar)`, flat (B, latent_size): the posterior in the prior's whitened coordinates
  (u = (z - prior mean) / prior std, group by group along the posterior-mean path). For a single layer with a
  N(0, I) prior that is just q(z|x); in general KL(N(mu, e^logvar) || N(0, I)) equals KL(q || p).
- `decode(u) -> pixel means` (B, C, H, W) in [0, 1], u in the same coordinates: u ~ N(0, I) is a sample of
  the prior, t * u a sample at temperature t, and decode(encode(x)[0]) a deterministic reconstruction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from vae.models.heads import Head
from vae.models.options import SECTIONS, ArchOptions, add_section  # noqa: F401 - SECTIONS: the face the config reads

MODELS: dict[str, type[nn.Module]] = {}  # model.arch -> its class; its options section is in SECTIONS


class Gaussian(NamedTuple):
    """A diagonal Gaussian; tensors of one shape, e.g. (B, D) or (B, C, h, w)."""

    mu: torch.Tensor
    logvar: torch.Tensor


class LatentGroup(NamedTuple):
    """One group of latents: its sample from q, the posterior q(z | x, z_above) and the prior p(z | z_above)."""

    z: torch.Tensor
    q: Gaussian
    p: Gaussian


class VAEOutput(NamedTuple):
    params: torch.Tensor  # (B, P, H, W): the decoder's parameters of p(x|z) per pixel, layout per `model.head`
    groups: tuple[LatentGroup, ...]  # top (first sampled) to bottom; a single-layer VAE has one


def standard_normal(like: torch.Tensor) -> Gaussian:
    return Gaussian(torch.zeros_like(like), torch.zeros_like(like))


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """z = mu + sigma * eps with eps ~ N(0, I): the sample stays differentiable in mu and logvar."""
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


class VAE(nn.Module):
    """Base of the single-latent-layer models (prior N(0, I)): subclasses define `encode` and `decode_params`.

    `likelihood` (and `mixtures`, `gaussian_std`) choose the output head: how many parameters per pixel the
    decoder emits and which pixel mean they imply (vae/models/heads.py); densities live in
    vae/objectives/elbo/likelihoods.py.
    """

    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int, likelihood: str = "bernoulli",
                 mixtures: int = 10, gaussian_std: float = 0.1):
        super().__init__()
        self.image_shape = tuple(int(n) for n in image_shape)
        self.latent_size = latent_dim
        self.head = Head.build(likelihood, self.image_shape[0], mixtures=mixtures, gaussian_std=gaussian_std)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) in [0, 1] -> mu, logvar (B, D)."""
        raise NotImplementedError

    def decode_params(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, D) -> the parameters of p(x|z), (B, head.channels, H, W)."""
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z -> pixel means in [0, 1]."""
        return self.head.mean(self.decode_params(z))

    def forward(self, x: torch.Tensor, samples: int = 1) -> VAEOutput:
        mu, logvar = self.encode(x)  # once per image, whatever `samples` is
        if samples > 1:
            mu, logvar = mu.repeat(samples, 1), logvar.repeat(samples, 1)
        z = reparameterize(mu, logvar)
        return VAEOutput(self.decode_params(z), (LatentGroup(z, Gaussian(mu, logvar), standard_normal(mu)),))


def register_model(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make a model available as model.arch `name`, with its `Options` section (the typed
    options its constructor takes, vae/models/options.py); a second model under the same name raises."""
    def add(cls: type[nn.Module]) -> type[nn.Module]:
        if name in MODELS:
            raise ValueError(f"model {name!r} is registered twice ({MODELS[name].__qualname__}, {cls.__qualname__})")
        options = getattr(cls, "Options", None)
        if not (isinstance(options, type) and issubclass(options, ArchOptions)):
            raise ValueError(f"model {name!r} ({cls.__qualname__}) declares no Options section (a subclass of "
                             "vae.models.options.ArchOptions)")
        add_section(name, options)
        MODELS[name] = cls
        return cls

    return add


def build_model(arch: str, image_shape: tuple[int, int, int], latent_dim: int, **options) -> nn.Module:
    """Instantiate `arch` for images of shape (C, H, W); a size the architecture cannot take raises ValueError."""
    if arch not in MODELS:
        raise ValueError(f"unknown model architecture {arch!r}; valid: {', '.join(sorted(MODELS))}")
    return MODELS[arch](image_shape=tuple(image_shape), latent_dim=latent_dim, **options)


def check_divisible(arch: str, image_shape: tuple[int, int, int], factor: int, fix: str) -> None:
    """Fail at build time, before any training step, on an image side the architecture's strides cannot take."""
    _, h, w = image_shape
    if h % factor or w % factor:
        raise ValueError(f"model.arch {arch!r} needs image sides divisible by {factor}, got {h}x{w}: {fix}")


from vae.models import aekl, conv, hvae, mlp, resnet  # noqa: E402,F401  (registers the built-in architectures)
