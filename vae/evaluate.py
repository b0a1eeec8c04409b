"""Validation figures: ELBO, its reconstruction and KL parts, and reconstruction MSE. Nats per image."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from vae.losses import elbo_terms

# Order of the running sums kept on the device during evaluation.
_SUMS = ("elbo", "recon", "kl", "recon_mse")


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 in [0, 1]."""
    return images.float().div_(255.0)


@torch.no_grad()
def evaluation_sums(model: torch.nn.Module, batches: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Per-image sums over the batches, as one float64 tensor (elbo, recon, kl, recon_mse, count).

    Kept on the device and summed there: one host sync at the end, and ranks can all-reduce it as it is.
    `recon_mse` is the per-pixel squared error of the decoded posterior mean, averaged over pixels per image.
    """
    sums = torch.zeros(len(_SUMS) + 1, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    for images in batches:
        x = to_unit(images.to(device, non_blocking=True))
        out = model(x)
        terms = elbo_terms(out, x)
        mean = torch.sigmoid(model.decode_logits(out.mu).float())
        mse = (mean - x).pow(2).flatten(1).mean(1)
        stacked = torch.stack([terms.elbo, terms.recon, terms.kl, mse]).double().sum(1)
        sums[:-1] += stacked
        sums[-1] += len(x)
    model.train(was_training)
    return sums


def to_metrics(sums: torch.Tensor) -> dict[str, float]:
    """Sums (possibly all-reduced over ranks) -> `val/*` metrics as floats."""
    values = sums.tolist()
    count = values[-1]
    if count == 0:
        raise ValueError("evaluation saw no images; check data.val_split")
    return {f"val/{name}": total / count for name, total in zip(_SUMS, values[:-1], strict=True)}
