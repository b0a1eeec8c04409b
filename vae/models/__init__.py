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

import importlib
from typing import TYPE_CHECKING, Any

from vae.models.options import SECTIONS, ArchOptions  # noqa: F401 - torch-free: what the run config reads

# The rest of the face is loaded on first use (PEP 562): it imports torch (~2 s), which the run config and
# `vaepipe --help` never need. Old logged models import `build_model` from here and keep working.
_LAZY = {
    **dict.fromkeys(("VAE", "VAEOutput", "Gaussian", "LatentGroup", "check_divisible", "reparameterize",
                     "standard_normal"), "vae.models.base"),
    **dict.fromkeys(("MODELS", "build_model", "register_model", "resolve_options"), "vae.models.registry"),
}

if TYPE_CHECKING:
    from vae.models.base import VAE, Gaussian, LatentGroup, VAEOutput, check_divisible, reparameterize  # noqa: F401
    from vae.models.registry import MODELS, build_model, register_model, resolve_options  # noqa: F401


# By hand, not lazy_loader: six lines, and vae.models is carried as code into every logged model, whose
# requirements should stay torch, pydantic and MLflow's own.
def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'vae.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # once: later lookups skip this function
    return value
