"""The ELBO family's objective: the VAEs of vae/models on the ELBO or the IWAE-k bound (vae/objectives/elbo/losses.py),
judged by the IWAE NLL, bits/dim and the latent plots."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from vae.objectives.base import NLL, Backward, FinalEvaluation, Objective, Picture, reduced, register_objective, unwrap
from vae.objectives.elbo import plots
from vae.objectives.elbo.evaluation import evaluation_sums, evaluation_totals, rows_within, summarize, to_metrics
from vae.objectives.elbo.losses import training_loss
from vae.objectives.inputs import to_input


@register_objective("elbo")
class ELBOObjective(Objective):
    """The VAEs of vae/models trained on the ELBO (or the IWAE-k bound: loss.objective); see elbo/losses.py."""

    metrics = ("loss", "elbo", "recon", "kl")
    champion = NLL
    picture = Picture("samples.png", "samples from the prior")
    grid_images = 32  # four rows of 8 originals, each over its reconstructions

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

    def validation_grid(self, model: nn.Module, x: torch.Tensor, path: Path) -> Path:
        return plots.reconstructions(unwrap(model).eval(), x, path, n=self.grid_images)

    def final_evaluation(self, accelerator, model: nn.Module, val_loader) -> FinalEvaluation:
        """ELBO, IWAE NLL (loss.eval_iwae_k), bits/dim, KL per dimension and active units (elbo/evaluation.py)."""
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
        plots.samples(model, model.latent_size, out / self.picture.file, seed=seed)
        plots.temperatures(model, out / "temperatures.png", seed=seed)
        plots.reconstructions(model, x[:32], out / "reconstructions.png")
        plots.traversals(model, x[:1], by_kl, out / "traversals.png")
        plots.interpolations(model, x[: min(len(x), 64)], out / "interpolations.png")
        if model.latent_size == 2:
            plots.manifold(model, out / "manifold.png")

    @classmethod
    def version_tags(cls, metrics: dict[str, float]) -> dict[str, str]:
        return {"val_elbo": repr(float(metrics["val/elbo"])), "val_bpd": repr(float(metrics["val/bpd"]))}


