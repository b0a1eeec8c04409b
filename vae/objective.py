"""The seam between the trainer and what an architecture minimises.

An `Objective` names the models it trains (the architecture's model first, then any others: an adversarial
objective adds its discriminator), computes and backpropagates its losses for one micro-batch, and says which
metrics it logs during training and validation. The trainer does the rest for every model alike: Accelerate's
`prepare` (devices, DDP, mixed precision), gradient accumulation, clipping, the non-finite guard, one optimiser
per model and its steps, the learning-rate schedule, EMA, checkpoints and exact resume. So the loop in
vae/trainer.py has no branch on the architecture.

Objectives are registered by name (`OBJECTIVES`, loud on unknown and duplicate names); a model config section
names its objective in the class variable `objective` (vae/config.py), so the ELBO VAEs share `elbo`.

Contract of `step` with several models (a GAN-style objective): each loss must put gradients only on the models it
trains. Backpropagate the generator's loss through the discriminator's *unwrapped* module with its parameters
frozen (`frozen` below: no gradient reaches them, and DDP's hooks, which expect every parameter of a wrapped
forward to get one, are not involved), and the discriminator's loss on detached reconstructions through its
wrapped (DDP) module. A model whose loss is not on yet (before a `disc_start` step) gets no gradient: its
optimiser step leaves it and its state untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import ClassVar

import torch
from torch import nn

from vae.config import RunConfig
from vae.data import to_input
from vae.evaluate import evaluation_sums, to_metrics
from vae.losses import training_loss, unwrap

Backward = Callable[[torch.Tensor], None]  # accelerator.backward: scales the loss for fp16 and accumulation

OBJECTIVES: dict[str, type[Objective]] = {}


def register(name: str):
    """Class decorator: make an Objective available under `name`; a second one under the same name raises."""
    def add(cls: type[Objective]) -> type[Objective]:
        if name in OBJECTIVES:
            raise ValueError(f"objective {name!r} is registered twice ({OBJECTIVES[name].__name__}, {cls.__name__})")
        OBJECTIVES[name] = cls
        return cls
    return add


def build_objective(cfg: RunConfig) -> Objective:
    """The objective cfg.model's section names; an unknown one raises listing the registered ones."""
    name = type(cfg.model).objective
    if name not in OBJECTIVES:
        raise ValueError(f"model.arch {cfg.model.arch!r} trains with objective {name!r}, which is not registered; "
                         f"registered: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name](cfg)


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Parameters of `module` get no gradient inside (the generator's loss through a discriminator)."""
    states = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, state in zip(module.parameters(), states, strict=True):
            p.requires_grad_(state)


class Objective:
    """What one family of architectures minimises. Subclasses set `metrics` and define `step` and validation."""

    metrics: ClassVar[tuple[str, ...]]  # logged as train/<name>: the per-image mean of what `step` sums

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    def models(self, model: nn.Module) -> dict[str, nn.Module]:
        """Every model trained, by name, `model` (the architecture's, evaluated and exported) first. The trainer
        gives each its own optimiser (from cfg.optim unless `optimizer` says otherwise) and EMA when kept."""
        return {"model": model}

    def optimizer(self, name: str, module: nn.Module) -> torch.optim.Optimizer | None:
        """The optimiser of model `name`, or None for the trainer's default (cfg.optim over all its parameters)."""
        return None

    def lr_scale(self, name: str) -> float:
        """Model `name`'s learning rate as a multiple of the scheduled one."""
        return 1.0

    def step(self, models: dict[str, nn.Module], x: torch.Tensor, step: int, backward: Backward) -> torch.Tensor:
        """Compute the losses of micro-batch `x` (model input, (B, C, H, W)) at optimiser step `step`, call
        `backward` on each, and return the batch's sums of `metrics`, detached, on x's device: (len(metrics),).
        `models` are the prepared (possibly DDP-wrapped, autocast) ones, by the names `models()` gave."""
        raise NotImplementedError

    def validation_sums(self, model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
        """Sums over this rank's validation batches (uint8 images) that ranks can all-reduce."""
        raise NotImplementedError

    def validation_metrics(self, sums: torch.Tensor) -> dict[str, float]:
        """val/<name> metrics from all ranks' summed `validation_sums`."""
        raise NotImplementedError

    def summary(self, val: dict[str, float]) -> str:
        """One line for the end of an epoch."""
        return ", ".join(f"{k} {v:.4f}" for k, v in val.items())


@register("elbo")
class ELBOObjective(Objective):
    """The VAEs of vae/models trained on the ELBO (or the IWAE-k bound: loss.objective); see vae/losses.py."""

    metrics = ("loss", "elbo", "recon", "kl")

    def step(self, models: dict[str, nn.Module], x: torch.Tensor, step: int, backward: Backward) -> torch.Tensor:
        terms = training_loss(models["model"], x, self.cfg.loss, step)  # autocast: accelerate's forward
        backward(terms.loss)
        return torch.stack((terms.loss * len(x), terms.elbo.sum(), terms.recon.sum(), terms.kl.sum())).detach()

    def validation_sums(self, model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
        # validation sees the inputs training sees (binarised or dequantised per data.*)
        return evaluation_sums(model, batches, device, prepare=lambda images: to_input(images, self.cfg))

    def validation_metrics(self, sums: torch.Tensor) -> dict[str, float]:
        return to_metrics(sums)

    def summary(self, val: dict[str, float]) -> str:
        return (f"val ELBO {val['val/elbo']:.3f} nats (recon {val['val/recon']:.3f}, KL {val['val/kl']:.3f}), "
                f"recon MSE {val['val/recon_mse']:.4f}")


@register("aekl")
class AeklObjective(Objective):
    """diffusers' AutoencoderKL on LDM's loss (vae/aekl_losses.py): per micro-batch the autoencoder's loss (pixel
    L1/L2 + perceptual + kl_weight * KL + the adaptive-weighted GAN term from loss.aekl.disc_start), then the
    PatchGAN discriminator's on the detached reconstructions, with its own optimiser (loss.aekl.disc_lr)."""

    metrics = ("loss", "recon", "perceptual", "kl", "g_loss", "d_weight", "disc_loss")

    def __init__(self, cfg: RunConfig) -> None:
        from vae.aekl_losses import build_lpips

        super().__init__(cfg)
        # frozen and not trained: neither prepared, checkpointed nor averaged; its weights come from a local file
        self.lpips = build_lpips(cfg.loss.aekl)

    def models(self, model: nn.Module) -> dict[str, nn.Module]:
        from vae.aekl_losses import build_discriminator

        disc = build_discriminator(self.cfg.loss.aekl, model.image_shape[0])
        return {"model": model} if disc is None else {"model": model, "discriminator": disc}

    def lr_scale(self, name: str) -> float:
        disc_lr = self.cfg.loss.aekl.disc_lr
        return disc_lr / self.cfg.optim.lr if name == "discriminator" and disc_lr is not None else 1.0

    def step(self, models: dict[str, nn.Module], x: torch.Tensor, step: int, backward: Backward) -> torch.Tensor:
        from vae.aekl_losses import disc_factor, discriminator_loss, generator_loss

        cfg, model, disc = self.cfg.loss.aekl, models["model"], models.get("discriminator")
        if self.lpips is not None:
            self.lpips.to(x.device)  # a no-op after the first step
        out = model(x, autoencode=True)  # through DDP and autocast
        zero = torch.zeros((), device=x.device)
        inner = getattr(disc, "module", disc)  # the generator's term: past DDP, parameters frozen
        with frozen(inner) if inner is not None else contextlib.nullcontext():
            terms = generator_loss(out, x, cfg, step, self.lpips, inner, last_layer=unwrap(model).last_layer)
            backward(terms.loss)
        disc_loss = zero
        if disc is not None and disc_factor(cfg, step) > 0:  # before disc_start the discriminator is not run at all
            d = discriminator_loss(disc, x, out.recon.detach(), cfg, step)
            backward(d.loss)
            disc_loss = d.loss.detach()
        parts = (terms.loss.detach(), terms.recon, terms.perceptual, terms.kl, terms.g_loss, terms.d_weight, disc_loss)
        return torch.stack([p.float() for p in parts]) * len(x)  # batch means -> sums over the batch's images

    def validation_sums(self, model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
        from vae.aekl_eval import aekl_sums

        sums, _ = aekl_sums(unwrap(model), batches, device, prepare=lambda images: to_input(images, self.cfg))
        return sums[[0, 1, 3]]  # psnr, ssim, count; LPIPS and the latent statistics are the final evaluation's

    def validation_metrics(self, sums: torch.Tensor) -> dict[str, float]:
        psnr, ssim, n = sums.tolist()
        return {"val/psnr": psnr / n, "val/ssim": ssim / n}

    def summary(self, val: dict[str, float]) -> str:
        return f"val PSNR {val['val/psnr']:.2f} dB, SSIM {val['val/ssim']:.4f}"
