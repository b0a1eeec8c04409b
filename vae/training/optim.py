"""Optimisers for large global batches, where few steps must each do more: LAMB and Muon (with AdamW).

LAMB is Adam with a layer-wise trust ratio (You et al. 2020, "Large Batch Optimization for Deep Learning: Training
BERT in 76 minutes", algorithm 2). Adam's update has about the same size for every parameter whatever the gradient's
scale, so the learning rate that a large batch allows is capped by the layer that tolerates the least. LAMB rescales
each parameter tensor's Adam update `r` (plus weight decay) to `lr * ||w|| / ||r||`: every layer moves by the same
fraction of its norm, which lets a higher rate through without destabilising the small layers.

In LAMB, biases and other 1-D tensors (norm scales) take the plain Adam step, as in the reference implementation
(`exclude_from_layer_adaptation`): a step proportional to its own norm could never carry a bias across zero.

Muon (MuonAdamW) measured better than LAMB at batch 8,192 (bench/LOG.md): 0.4 nats from batch 128, against 2.0.
"""

from __future__ import annotations

import math

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
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                m, v, t = adam_moments(self.state[p], p, group["betas"])
                update = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt_().add_(group["eps"]))
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                if p.ndim > 1:
                    w_norm, u_norm = p.norm(), update.norm()
                    trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                    update.mul_(trust.clamp(max=group["max_trust"]))
                p.add_(update, alpha=-group["lr"])
        return loss


class MuonAdamW(Optimizer):
    """Muon for weight matrices and conv filters, AdamW for everything else, in one optimiser (Jordan et al.
    2024, "Muon: An optimizer for hidden layers"; the single-optimiser form is the reference's
    `MuonWithAuxAdam`).

    Muon replaces each matrix's momentum by its nearest semi-orthogonal matrix (five Newton-Schulz iterations),
    so every direction of the update moves by the same amount instead of the few dominant ones. It keeps making
    progress per step where Adam's updates are dominated by a few directions, which is what a large batch, with
    few steps, needs. A conv filter (out, in, kh, kw) is treated as the (out, in*kh*kw) matrix.

    The matrix step is torch.optim.Muon's (nesterov momentum, bf16 Newton-Schulz); its rate follows Moonshot's
    `match_rms_adamw` rule (0.2 * sqrt(max(A, B))), so one `lr` suits both kinds of tensor, and the trainer's
    schedule sets it for every group alike. Tensors of fewer than two dimensions (biases, norm scales) take
    AdamW.
    """

    NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.95, ns_steps: int = 5):
        if lr <= 0 or eps <= 0 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1 or weight_decay < 0:
            raise ValueError(f"invalid Muon settings: lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        params = list(params)
        if params and isinstance(params[0], dict):
            raise ValueError("MuonAdamW groups the parameters itself (matrices vs the rest); pass the tensors")
        groups = [{"params": [p for p in params if p.ndim >= 2], "muon": True},
                  {"params": [p for p in params if p.ndim < 2], "muon": False}]
        super().__init__([g for g in groups if g["params"]], {"lr": lr, "betas": betas, "eps": eps,
                                                               "weight_decay": weight_decay, "momentum": momentum,
                                                               "ns_steps": ns_steps})

    @torch.no_grad()
    def step(self, closure=None):
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                p.mul_(1 - lr * wd)
                if group["muon"]:
                    if not state:
                        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    buf = state["momentum_buffer"]
                    buf.lerp_(p.grad, 1 - group["momentum"])
                    update = orthogonalize(p.grad.lerp(buf, group["momentum"]).flatten(1), group["ns_steps"])
                    rows, cols = update.shape
                    p.add_(update.view_as(p), alpha=-lr * 0.2 * math.sqrt(max(rows, cols)))
                    continue
                beta1, beta2 = group["betas"]
                m, v, t = adam_moments(state, p, group["betas"])
                denom = (v.sqrt() / (1 - beta2**t) ** 0.5).add_(group["eps"])  # torch's AdamW, to the bit
                p.addcdiv_(m, denom, value=-(lr / (1 - beta1**t)))
        return loss


def evaluate_closure(closure) -> torch.Tensor | None:
    """The loss from `Optimizer.step`'s optional closure, with gradients on (step itself runs without)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def adam_moments(state: dict, p: torch.Tensor, betas: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Adam's running mean and mean square of `p.grad`, kept in `state` (created on the first call) under torch's
    Adam keys, updated for this step; and the step count, 1 on the first call."""
    if not state:
        state["step"] = torch.zeros((), dtype=torch.float32)  # a tensor, as torch's Adam keeps it
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    state["step"] += 1
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m.lerp_(p.grad, 1 - betas[0])
    v.mul_(betas[1]).addcmul_(p.grad, p.grad, value=1 - betas[1])
    return m, v, float(state["step"])


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The quintic Newton-Schulz iteration of Muon, in bf16: roughly U S' V^T for g = U S V^T, with S' near 1."""
    a, b, c = MuonAdamW.NS_COEFFICIENTS
    x = g.bfloat16()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if tall else x).to(g.dtype)


def step_kernels(name: str, device: torch.device | str) -> dict[str, bool]:
    """Constructor options for torch's Adam/AdamW (`name` "adam" or "adamw") on `device`: the fused kernel on
    CUDA (one launch for every tensor, and the on-device skip of vae.training.step_guard through `found_inf`), the
    foreach kernels elsewhere (a few launches per step instead of several per tensor; on a CPU the same result as the
    per-tensor loop). LAMB and Muon are ours and take neither: {}."""
    if name not in ("adam", "adamw"):
        return {}
    return {"fused": True} if torch.device(device).type == "cuda" else {"foreach": True}
