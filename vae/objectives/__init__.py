"""Objectives: what an architecture minimises and how its model is judged, the seam between models and the trainer.

- `base`: the `Objective` interface, its registry (`register_objective`, by name and by the architectures it
  trains), `FinalEvaluation`, the champion `Criterion` each objective names (NLL, PSNR) and the `Picture` a report
  shows;
- `inputs`: uint8 batches -> model inputs (binarised, dequantised, in the run's memory format);
- `elbo/`: the ELBO family: likelihoods, ELBO and IWAE losses, evaluation (IWAE NLL, bits/dim), plots;
- `aekl/`: LDM's autoencoder loss with its discriminator and LPIPS, evaluation (PSNR, SSIM, LPIPS, rFID, latents)
  under a stored `EvaluationProtocol` (`aekl/protocol.py`, torch-free), run alike by the end of training and
  `vaepipe evaluate`; rFID's parts and cached real statistics (`aekl/fid.py`).

Owns losses and evaluation; pure functions of tensors. Imports config and models; never imports training,
tracking, registry or launch code, nor accelerate's or MLflow's APIs (an `accelerator` is handed in, duck-typed).
"""

from vae.objectives import aekl, elbo  # noqa: F401 - registers the built-in objectives
from vae.objectives.base import (
    ARCH_OBJECTIVES,
    CRITERIA,
    NLL,
    OBJECTIVES,
    PSNR,
    Backward,
    Criterion,
    FinalEvaluation,
    Objective,
    Picture,
    build_objective,
    objective_class,
    register_objective,
    unwrap,
)

__all__ = ["ARCH_OBJECTIVES", "CRITERIA", "NLL", "OBJECTIVES", "PSNR", "Backward", "Criterion", "FinalEvaluation",
           "Objective", "Picture", "build_objective", "objective_class", "register_objective", "unwrap"]
