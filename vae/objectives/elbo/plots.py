"""The pictures people look at (PNG files): latent scatter, 2-D manifold, samples at several temperatures,
reconstructions, latent traversals, interpolations between test images.

Latents are in the coordinates of `model.encode` / `model.decode` (vae/models/__init__.py): whitened, so
N(0, I) is the prior for every architecture and `t * N(0, I)` a sample at temperature t."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import make_grid, save_image  # noqa: E402


def _save_grid(images: torch.Tensor, path: Path, nrow: int) -> Path:
    """Tile images (N, C, H, W) in [0, 1]; tiles under 32 px are enlarged (nearest) so 8x8 digits stay legible."""
    scale = max(1, 32 // images.shape[-1])
    if scale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
    save_image(make_grid(images, nrow=nrow, padding=2, pad_value=0.5), path)
    return path


def latent_scatter(mu: np.ndarray, labels: np.ndarray | None, path: Path) -> Path:
    """The test set's latent means, first two dimensions, coloured by label."""
    fig, ax = plt.subplots(figsize=(7, 6))
    y = mu[:, 1] if mu.shape[1] > 1 else np.zeros(len(mu))
    points = ax.scatter(mu[:, 0], y, c=labels if labels is not None else None, cmap="tab10", s=4)
    if labels is not None:
        fig.colorbar(points, ax=ax, label="label")
    ax.set(xlabel="z[0]", ylabel="z[1]", title="Latent means of the validation images")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@torch.no_grad()
def manifold(model: torch.nn.Module, path: Path, n: int = 15, device: str | torch.device = "cpu") -> Path:
    """Decode an n x n grid of N(0, 1) quantiles from 0.01 to 0.99 (2-D latents only)."""
    q = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.01, 0.99, n))
    zy, zx = torch.meshgrid(q.flip(0), q, indexing="ij")  # rows top to bottom = high to low z[1]
    z = torch.stack([zx.flatten(), zy.flatten()], 1).to(device)
    return _save_grid(model.decode(z).float().cpu(), path, nrow=n)


@torch.no_grad()
def samples(model: torch.nn.Module, latent_dim: int, path: Path, n: int = 64, seed: int = 0,
            device: str | torch.device = "cpu") -> Path:
    """n samples of the prior, decoded to pixel means; `latent_dim` is the model's `latent_size`."""
    z = torch.randn(n, latent_dim, generator=torch.Generator().manual_seed(seed)).to(device)
    return _save_grid(model.decode(z).float().cpu(), path, nrow=int(n**0.5))


@torch.no_grad()
def temperatures(model: torch.nn.Module, path: Path, temps: tuple[float, ...] = (0.5, 0.7, 0.85, 1.0),
                 n: int = 10, seed: int = 0) -> Path:
    """One row per temperature t: decode(t * u) with the same u ~ N(0, I) in every row."""
    u = torch.randn(n, model.latent_size, generator=torch.Generator().manual_seed(seed))
    return _save_grid(torch.cat([model.decode(t * u).float() for t in temps]), path, nrow=n)


@torch.no_grad()
def traversals(model: torch.nn.Module, x: torch.Tensor, dims: list[int], path: Path, span: float = 3.0,
               steps: int = 9) -> Path:
    """One row per latent dimension in `dims`: the posterior mean of image x (1, C, H, W) with that dimension
    swept from -span to +span (prior standard deviations), everything else held."""
    mu, _ = model.encode(x[:1])
    values = torch.linspace(-span, span, steps)
    rows = []
    for d in dims:
        z = mu.repeat(steps, 1)
        z[:, d] = values
        rows.append(model.decode(z).float())
    return _save_grid(torch.cat(rows), path, nrow=steps)


@torch.no_grad()
def interpolations(model: torch.nn.Module, x: torch.Tensor, path: Path, pairs: int = 4, steps: int = 10) -> Path:
    """Rows of linear interpolations between the posterior means of test images 2i and 2i + 1."""
    mu, _ = model.encode(x[: 2 * pairs])
    t = torch.linspace(0, 1, steps).unsqueeze(1)
    rows = [model.decode((1 - t) * mu[i] + t * mu[i + 1]).float() for i in range(0, len(mu) - 1, 2)]
    return _save_grid(torch.cat(rows), path, nrow=steps)


@torch.no_grad()
def reconstructions(model: torch.nn.Module, x: torch.Tensor, path: Path, n: int = 32) -> Path:
    """Originals on odd rows, their posterior-mean reconstructions below them."""
    x = x[:n]
    mu, _ = model.encode(x)
    recon = model.decode(mu).float().cpu()
    rows = 8
    pairs = [t for i in range(0, len(x), rows) for t in (x[i : i + rows].cpu(), recon[i : i + rows])]
    return _save_grid(torch.cat(pairs), path, nrow=rows)
