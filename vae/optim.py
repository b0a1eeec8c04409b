"""LAMB: Adam with a layer-wise trust ratio, for large global batches (You et al. 2020, "Large Batch
Optimization for Deep Learning: Training BERT in 76 minutes", algorithm 2).

Adam's update has about the same size for every parameter whatever the gradient's scale, so the learning rate
that a large batch allows is capped by the layer that tolerates the least. LAMB rescales each parameter
tensor's Adam update `r` (plus weight decay) to `lr * ||w|| / ||r||`: every layer moves by the same fraction
of its norm, which lets a higher rate through without destabilising the small layers.

Biases and other 1-D tensors (norm scales) take the plain Adam step, as in the reference implementation
(`exclude_from_layer_adaptation`): a step proportional to its own norm could never carry a bias across zero.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer


class Lamb(Optimizer):
    """LAMB with bias correction. 1-D tensors, and any tensor whose weight or update norm is zero, take the
    plain Adam step (trust ratio 1); `max_trust` bounds the ratio, as reference implementations do."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, max_trust: float = 10.0):
        if lr <= 0 or eps <= 0 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1 or weight_decay < 0:
            raise ValueError(f"invalid LAMB settings: lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                                  "max_trust": max_trust})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)  # a tensor, as torch's Adam keeps it
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = float(state["step"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(p.grad, 1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                update = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt_().add_(group["eps"]))
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                if p.ndim > 1:
                    w_norm, u_norm = p.norm(), update.norm()
                    trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                    update.mul_(trust.clamp(max=group["max_trust"]))
                p.add_(update, alpha=-group["lr"])
        return loss
