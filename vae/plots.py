"""The pictures people look at: latent scatter, 2-D manifold, samples, reconstructions (PNG files)."""

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
    z = torch.randn(n, latent_dim, generator=torch.Generator().manual_seed(seed)).to(device)
    return _save_grid(model.decode(z).float().cpu(), path, nrow=int(n**0.5))


@torch.no_grad()
def reconstructions(model: torch.nn.Module, x: torch.Tensor, path: Path, n: int = 32) -> Path:
    """Originals on odd rows, their posterior-mean reconstructions below them."""
    x = x[:n]
    mu, _ = model.encode(x)
    recon = model.decode(mu).float().cpu()
    rows = 8
    pairs = [t for i in range(0, len(x), rows) for t in (x[i : i + rows].cpu(), recon[i : i + rows])]
    return _save_grid(torch.cat(pairs), path, nrow=rows)
