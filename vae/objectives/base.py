"""The seam between the trainer and what an architecture minimises.

An `Objective` names the models it trains (the architecture's model first, then any others: an adversarial
objective adds its discriminator), computes and backpropagates its losses for one micro-batch, and says which
metrics it logs during training and validation. The trainer does the rest for every model alike: Accelerate's
`prepare` (devices, DDP, mixed precision), gradient accumulation, clipping, the non-finite guard, one optimiser
per model and its steps, the learning-rate schedule, EMA, checkpoints and exact resume. So the loop in
vae/training/trainer.py has no branch on the architecture.

At each validation the objective draws what people look at while it trains: `validation_grid`, its
reconstructions of the first validation images, which the trainer journals as an image at that step.

After training, the objective also says how its model is judged (vae/training/finish.py calls these on every
architecture alike): `final_evaluation` (every rank, on the training devices, each its slice of the validation
split, the sums all-reduced), `draw` (rank 0, the plots), `version_tags` (the registered version's headline
figures) and `champion` (the registry's criterion: for the ELBO family the validation NLL, lower is better; for
aekl the validation PSNR, higher is better).

Objectives are registered by name (`OBJECTIVES`, loud on unknown and duplicate names) with the architectures they
train (`ARCH_OBJECTIVES`); every other architecture trains on `elbo`, so the ELBO VAEs share it and a model never
names its objective.

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
from typing import ClassVar, NamedTuple

import numpy as np
import torch
from torch import nn

from vae.config import RunConfig

Backward = Callable[[torch.Tensor], None]  # accelerator.backward: scales the loss for fp16 and accumulation

OBJECTIVES: dict[str, type[Objective]] = {}
ARCH_OBJECTIVES: dict[str, str] = {}  # model.arch -> the objective that trains it, where not DEFAULT_OBJECTIVE
DEFAULT_OBJECTIVE = "elbo"


class Criterion(NamedTuple):
    """What makes a registered version the champion: the metric, the version tag that holds it, its direction."""

    metric: str  # the val/* name in metrics.json
    tag: str  # the model version tag that carries it (repr of the float)
    higher_is_better: bool

    def best(self, scores: dict[int, float]) -> int:
        """The winning version: the best score, then the lowest version (a tie keeps the earlier one)."""
        sign = -1.0 if self.higher_is_better else 1.0
        return min(scores, key=lambda v: (sign * scores[v], v))


class Picture(NamedTuple):
    """The one picture a report shows of a finished run: a file `draw` writes into plots/, and what it shows."""

    file: str  # under plots/
    caption: str


NLL = Criterion("val/nll_iwae", "val_nll", higher_is_better=False)  # nats, the ELBO family's
PSNR = Criterion("val/psnr", "val_psnr", higher_is_better=True)  # dB, aekl's
CRITERIA = {c.tag: c for c in (NLL, PSNR)}  # evaluation.json names its criterion by tag


def register_objective(name: str, archs: tuple[str, ...] = ()):
    """Class decorator: make an Objective available under `name`, training the architectures `archs` (the others
    train on DEFAULT_OBJECTIVE); a second objective under the same name, or for the same arch, raises."""
    def add(cls: type[Objective]) -> type[Objective]:
        if name in OBJECTIVES:
            raise ValueError(f"objective {name!r} is registered twice ({OBJECTIVES[name].__name__}, {cls.__name__})")
        for arch in archs:
            if arch in ARCH_OBJECTIVES:
                raise ValueError(f"model.arch {arch!r} already trains with objective {ARCH_OBJECTIVES[arch]!r}")
            ARCH_OBJECTIVES[arch] = name
        OBJECTIVES[name] = cls
        return cls
    return add


def objective_class(cfg: RunConfig) -> type[Objective]:
    """The class of the objective that trains cfg.model.arch; an unknown one raises listing the registered ones."""
    name = ARCH_OBJECTIVES.get(cfg.model.arch, DEFAULT_OBJECTIVE)
    if name not in OBJECTIVES:
        raise ValueError(f"model.arch {cfg.model.arch!r} trains with objective {name!r}, which is not registered; "
                         f"registered: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name]


def build_objective(cfg: RunConfig) -> Objective:
    """The objective that trains cfg.model.arch (built: aekl's loads its LPIPS weights)."""
    return objective_class(cfg)(cfg)


def unwrap(model: nn.Module) -> nn.Module:
    """The model under DDP (`.module`) or torch.compile (`._orig_mod`) wrappers."""
    while not hasattr(model, "head"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


@dataclass
class FinalEvaluation:
    """What `Objective.final_evaluation` found: the same on every rank."""

    metrics: dict[str, float]  # the fixed val/* names (metrics.json, MLflow)
    details: dict  # the architecture's own figures for evaluation.json (KL per dimension; absent metrics, ...)
    headline: str  # one line for the log
    nonfinite: dict[str, str] = field(default_factory=dict)  # metric name -> why it is NaN or infinite
    latent_stats: dict | None = None  # aekl: scaling/shift factor and per-channel stats, into the exported config
    protocol_tags: dict[str, str] = field(default_factory=dict)  # aekl: the evaluation protocol, as version tags


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
    champion: ClassVar[Criterion]  # which registered version is the champion (vae/registry/versions.py)
    picture: ClassVar[Picture | None] = None  # the plot a report shows (evaluation.json names it); None: none
    grid_images: ClassVar[int] = 0  # the first validation images `validation_grid` draws; 0: it draws no grid

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

    def validation_grid(self, model: nn.Module, x: torch.Tensor, path: Path) -> Path:
        """Rank 0, at each validation when `grid_images` > 0: `model`'s reconstructions of `x` (the first
        `grid_images` validation inputs, on the model's device, the same at every validation) beside them, as a PNG
        at `path`."""
        raise NotImplementedError

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


