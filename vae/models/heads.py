"""Output heads: how many parameters per pixel a decoder emits for a likelihood, and the pixel mean they imply.

This is the part of a likelihood the model itself needs (its output width, and `decode` -> pixel means for the
MLflow model and the plots); the densities are in vae/objectives/elbo/likelihoods.py, which reads the same layout
from here.

Layouts, for C image channels, along dim 1 of the decoder output (B, channels, H, W):
- `bernoulli`: C logits; mean sigmoid(logits).
- `gaussian`: C mean logits, fixed std `gaussian_std`; mean sigmoid (bounded, so decode stays in [0, 1]).
- `gaussian_learned`: C mean logits, then C log-stds.
- `logistic_mixture`: K mixture logits (shared by the channels of a pixel), K*C means on the [-1, 1] scale,
  K*C log-scales (PixelCNN++ without its channel coupling); mean: the mixture mean mapped to [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def _sigmoid_mean(head: Head, params: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(params[:, : head.image_channels].float())


def _mixture_mean(head: Head, params: torch.Tensor) -> torch.Tensor:
    logits, means, _ = head.split_mixture(params)
    weights = torch.softmax(logits.float(), dim=1).unsqueeze(2)  # (B, K, 1, H, W)
    return ((weights * means.float()).sum(1) + 1).div(2).clamp(0, 1)


# likelihood name -> (decoder channels for C image channels and K mixtures, pixel mean)
LAYOUTS: dict[str, tuple[Callable[[int, int], int], Callable[[Head, torch.Tensor], torch.Tensor]]] = {
    "bernoulli": (lambda c, k: c, _sigmoid_mean),
    "gaussian": (lambda c, k: c, _sigmoid_mean),
    "gaussian_learned": (lambda c, k: 2 * c, _sigmoid_mean),
    "logistic_mixture": (lambda c, k: k * (1 + 2 * c), _mixture_mean),
}


@dataclass(frozen=True)
class Head:
    likelihood: str
    image_channels: int
    mixtures: int = 10
    gaussian_std: float = 0.1

    @classmethod
    def build(cls, likelihood: str, image_channels: int, mixtures: int = 10, gaussian_std: float = 0.1) -> Head:
        if likelihood not in LAYOUTS:
            raise ValueError(f"unknown likelihood {likelihood!r}; valid: {', '.join(LAYOUTS)}")
        if mixtures < 1 or gaussian_std <= 0:
            raise ValueError(f"need mixtures >= 1 and gaussian_std > 0, got {mixtures} and {gaussian_std}")
        return cls(likelihood, image_channels, mixtures, gaussian_std)

    @property
    def channels(self) -> int:
        """Decoder output channels."""
        return LAYOUTS[self.likelihood][0](self.image_channels, self.mixtures)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """Decoder output (B, channels, H, W) -> pixel means (B, C, H, W) in [0, 1], float32."""
        return LAYOUTS[self.likelihood][1](self, params)

    def split_mixture(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """logistic_mixture params -> logits (B, K, H, W), means and log-scales (B, K, C, H, W)."""
        k, c = self.mixtures, self.image_channels
        b, _, h, w = params.shape
        logits, rest = params[:, :k], params[:, k:].reshape(b, 2, k, c, h, w)
        return logits, rest[:, 0], rest[:, 1]
