"""The seam between the trainer and what an architecture minimises.

An `Objective` names the models it trains (the architecture's model first, then any others: an adversarial
objective adds its discriminator), computes and backpropagates its losses for one micro-batch, and says which
metrics it logs during training and validation. The trainer does the rest for every model alike: Accelerate's
`prepare` (devices, DDP, mixed precision), gradient accumulation, clipping, the non-finite guard, one optimiser
per model and its steps, the learning-rate schedule, EMA, checkpoints and exact resume. So the loop in
vae/trainer.py has no branch on the architecture.

After training, the objective also says how its model is judged (vae/finalize.py calls these on every
architecture alike): `final_evaluation` (every rank, on the training devices, each its slice of the validation
split, the sums all-reduced), `draw` (rank 0, the plots), `version_tags` (the registered version's headline
figures) and `champion` (the registry's criterion: for the ELBO family the validation NLL, lower is better; for
aekl the validation PSNR, higher is better).

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from vae import plots
from vae.config import RunConfig
from vae.data import to_input
from vae.evaluate import evaluation_sums, evaluation_totals, rows_within, summarize, to_metrics
from vae.losses import training_loss, unwrap
from vae.registry import NLL, PSNR, Criterion

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


def objective_class(cfg: RunConfig) -> type[Objective]:
    """The class of the objective cfg.model's section names; an unknown one raises listing the registered ones."""
    name = type(cfg.model).objective
    if name not in OBJECTIVES:
        raise ValueError(f"model.arch {cfg.model.arch!r} trains with objective {name!r}, which is not registered; "
                         f"registered: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name]


def build_objective(cfg: RunConfig) -> Objective:
    """The objective cfg.model's section names (built: aekl's loads its LPIPS weights)."""
    return objective_class(cfg)(cfg)


@dataclass
class FinalEvaluation:
    """What `Objective.final_evaluation` found: the same on every rank."""

    metrics: dict[str, float]  # the fixed val/* names (metrics.json, MLflow)
    details: dict  # the architecture's own figures for evaluation.json (KL per dimension; absent metrics, ...)
    headline: str  # one line for the log
    nonfinite: dict[str, str] = field(default_factory=dict)  # metric name -> why it is NaN or infinite
    latent_stats: dict | None = None  # aekl: scaling/shift factor and per-channel stats, into the exported config


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
    champion: ClassVar[Criterion]  # which registered version is the champion (vae/registry.py)

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

    def final_evaluation(self, accelerator, model: nn.Module, val_loader) -> FinalEvaluation:
        """Every rank: the figures of `model` (unwrapped, on this rank's device) over the validation split, each
        rank its exact slice (the loader's pad=False slices), the sums all-reduced: every rank returns the same."""
        raise NotImplementedError

    def draw(self, model: nn.Module, x: torch.Tensor, labels: np.ndarray | None, result: FinalEvaluation,
             out: Path) -> None:
        """Rank 0: the plots into `out`, from `model` on the CPU and `x`, the first validation inputs of rank 0."""
        raise NotImplementedError

    @classmethod
    def version_tags(cls, metrics: dict[str, float]) -> dict[str, str]:
        """The registered version's headline figures as tags (floats as repr: they round-trip exactly)."""
        return {}


def reduced(accelerator, sums: torch.Tensor) -> torch.Tensor:
    """All ranks' sums (one process: the sums themselves)."""
    return accelerator.reduce(sums, "sum") if accelerator.num_processes > 1 else sums


@register("elbo")
class ELBOObjective(Objective):
    """The VAEs of vae/models trained on the ELBO (or the IWAE-k bound: loss.objective); see vae/losses.py."""

    metrics = ("loss", "elbo", "recon", "kl")
    champion = NLL

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

    def final_evaluation(self, accelerator, model: nn.Module, val_loader) -> FinalEvaluation:
        """ELBO, IWAE NLL (loss.eval_iwae_k), bits/dim, KL per dimension and active units (vae/evaluate.py)."""
        cfg = self.cfg
        model = unwrap(model).eval()
        max_rows = rows_within(model, cfg.loss.eval_memory_mb << 20)
        torch.manual_seed(cfg.train.seed + accelerator.process_index)  # reproducible draws, independent per rank
        bar = tqdm(total=val_loader.samples_per_rank, unit="img", disable=not accelerator.is_main_process,
                   desc=f"final evaluation (IWAE k={cfg.loss.eval_iwae_k}, rank 0 of {accelerator.num_processes})")
        with bar:
            totals = evaluation_totals(model, (b.images for b in val_loader), cfg.loss.eval_iwae_k,
                                       lambda im: to_input(im, cfg), accelerator.device, max_rows, progress=bar)
        result = summarize(reduced(accelerator, totals), model)
        m = result.metrics
        return FinalEvaluation(
            m, {"kl_per_dim": result.kl_per_dim, "kl_per_group": result.kl_per_group, "active": result.active,
                "iwae_k": cfg.loss.eval_iwae_k},
            f"val NLL {m['val/nll_iwae']:.3f} nats (IWAE k={cfg.loss.eval_iwae_k}), {m['val/bpd']:.4f} bits/dim, "
            f"ELBO {m['val/elbo']:.3f}", result.nonfinite)

    def draw(self, model: nn.Module, x: torch.Tensor, labels: np.ndarray | None, result: FinalEvaluation,
             out: Path) -> None:
        seed = self.cfg.train.seed
        with torch.no_grad():
            mu = torch.cat([model.encode(chunk)[0] for chunk in
                            x.split(rows_within(model, self.cfg.loss.eval_memory_mb << 20))]).numpy()
        kl = result.details["kl_per_dim"]
        by_kl = sorted(range(model.latent_size), key=lambda d: -kl[d])[:8]  # the most used dimensions
        plots.latent_scatter(mu, labels, out / "latent_scatter.png")
        plots.samples(model, model.latent_size, out / "samples.png", seed=seed)
        plots.temperatures(model, out / "temperatures.png", seed=seed)
        plots.reconstructions(model, x[:32], out / "reconstructions.png")
        plots.traversals(model, x[:1], by_kl, out / "traversals.png")
        plots.interpolations(model, x[: min(len(x), 64)], out / "interpolations.png")
        if model.latent_size == 2:
            plots.manifold(model, out / "manifold.png")

    @classmethod
    def version_tags(cls, metrics: dict[str, float]) -> dict[str, str]:
        return {"val_elbo": repr(float(metrics["val/elbo"])), "val_bpd": repr(float(metrics["val/bpd"]))}


@register("aekl")
class AeklObjective(Objective):
    """diffusers' AutoencoderKL on LDM's loss (vae/aekl_losses.py): per micro-batch the autoencoder's loss (pixel
    L1/L2 + perceptual + kl_weight * KL + the adaptive-weighted GAN term from loss.aekl.disc_start), then the
    PatchGAN discriminator's on the detached reconstructions, with its own optimiser (loss.aekl.disc_lr)."""

    metrics = ("loss", "recon", "perceptual", "kl", "g_loss", "d_weight", "disc_loss")
    champion = PSNR

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

    def final_evaluation(self, accelerator, model: nn.Module, val_loader) -> FinalEvaluation:
        """PSNR and SSIM at full resolution, LPIPS with the objective's LPIPS (or local VGG weights), rFID when
        torch-fidelity's Inception weights are in the torch hub cache; the per-channel latent statistics and
        from them the scaling and shift factors (vae/aekl_eval.py). A metric without weights is `absent`."""
        from vae.aekl_eval import INCEPTION_FILE, aekl_metrics, aekl_sums, inception_weights_path, rfid

        model = unwrap(model).eval()
        device = accelerator.device
        lpips = self.lpips if self.lpips is not None else self.evaluation_lpips()
        if lpips is not None:
            lpips.to(device)

        def batches():
            return (b.images for b in val_loader)

        prepare = lambda images: to_input(images, self.cfg)  # noqa: E731 - validation sees what training sees
        sums, moments = aekl_sums(model, batches(), device, lpips, prepare)
        sums, moments = reduced(accelerator, sums), reduced(accelerator, moments)
        absent = {}
        if lpips is None:
            absent["val/lpips"] = ("no LPIPS VGG weights on this machine (loss.aekl.lpips_weights or the torch hub "
                                   "cache)")
        weights = inception_weights_path(None)
        # torchmetrics' FID all-gathers its feature statistics across ranks in compute()
        score = rfid(model, batches(), device, weights, prepare) if weights is not None else None
        if weights is None:
            absent["val/rfid"] = f"no Inception weights ({INCEPTION_FILE} in the torch hub cache)"
        metrics, stats = aekl_metrics(sums, moments, lpips is not None, score)
        nonfinite = {k: f"{k} is {v}" for k, v in metrics.items() if not np.isfinite(v)}
        headline = (f"val PSNR {metrics['val/psnr']:.2f} dB, SSIM {metrics['val/ssim']:.4f}, scaling_factor "
                    f"{stats.scaling_factor:.5f}, shift_factor {stats.shift_factor:.5f}")
        return FinalEvaluation(metrics, {"absent": absent, "latents": stats._asdict()}, headline, nonfinite,
                               latent_stats=stats._asdict())

    def evaluation_lpips(self) -> nn.Module | None:
        """LPIPS for the evaluation when training ran without it: only with VGG weights on this machine."""
        from vae.aekl_losses import build_lpips, vgg16_weights_path

        section = self.cfg.loss.aekl.model_copy(update={"perceptual_weight": 1.0})
        try:
            vgg16_weights_path(section)
        except FileNotFoundError:
            return None  # reported absent, never faked
        return build_lpips(section)

    def draw(self, model: nn.Module, x: torch.Tensor, labels: np.ndarray | None, result: FinalEvaluation,
             out: Path) -> None:
        from vae.aekl_eval import reconstruction_grid

        reconstruction_grid(model, x, out / "reconstructions.png", n=8)  # full resolution

    @classmethod
    def version_tags(cls, metrics: dict[str, float]) -> dict[str, str]:
        return {k.replace("/", "_"): repr(float(metrics[k]))  # val_psnr is the registry's own tag
                for k in ("val/ssim", "val/lpips", "val/scaling_factor", "val/shift_factor") if k in metrics}
