"""The run config's sections other than the model's: data, loss, optim, train, tracking. Each field has its type,
default and a description, which `--help` prints. The source and ingest sections are pipeline's own
(pipeline/settings.py, torch-free), used as they are by the ingest and here: one schema.

Owns: the section classes and their own validators. Imports pydantic and `pipeline.settings` only; reads no disk
and builds no model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.settings import IngestSection, Section, SourceSection, check_finite  # noqa: F401 - one schema, re-exported


class DataSection(Section):
    train_split: str = Field("train", description="Split to train on.")
    val_split: str = Field("test", description="Split for validation, evaluation and plots.")
    shuffle_buffer: int = Field(65536, gt=0, description="Samples shuffled together within a rank.")
    resident: Literal["auto", "on", "off"] = Field(
        "auto", description="Decode the split once into a uint8 tensor on the device; auto: when it fits "
        "data.memory_budget_mb."
    )
    memory_budget_mb: int = Field(2048, ge=0, description="Largest decoded split (MB) that auto keeps resident.")
    verify: bool = Field(False, description="Check each shard's sha256 before reading it (reads shards twice).")
    on_corrupt_shard: Literal["fail", "skip"] = Field(
        "fail", description="A shard that cannot be read during training: stop the run naming it, or warn, skip "
        "it (counted in train/skipped_shards) and repeat a few samples so every rank keeps its batch count."
    )
    workers: int | None = Field(
        None, ge=0, description="Processes per rank that read and decode encoded (JPEG/PNG) shards; default: the "
        "CPU cores per rank. Packed shards are read in the training process, where they are fastest."
    )
    decode_device: Literal["cpu", "cuda"] = Field(
        "cpu", description="Where JPEG shards are decoded: cpu (in the workers) or cuda (whole batches on the "
        "training GPU with nvJPEG; needs a CUDA device)."
    )
    crop_size: tuple[int, int] | None = Field(
        None, description="Train on random (H, W) crops of the stored images (validation: the centre crop); the "
        "model is built for this size. Seeded by (seed, epoch, rank, batch), so resume stays exact."
    )
    flip: bool = Field(False, description="Mirror training images horizontally at random (seeded like crops).")
    binarize: bool = Field(
        False, description="Dynamic binarisation: a fresh Bernoulli(pixel) draw every time an image is seen."
    )
    dequantize: bool = Field(
        False, description="Uniform dequantisation (x + u) / 256, u ~ U[0, 1), for continuous likelihoods."
    )

    @model_validator(mode="after")
    def _one_transform(self) -> DataSection:
        if self.binarize and self.dequantize:
            raise ValueError("data.binarize and data.dequantize exclude each other: binarised pixels are 0/1, "
                             "dequantised ones continuous; turn one off")
        return self


class AeklLossSection(Section):
    """The aekl objective (vae/objectives/aekl/losses.py): reconstruction + kl_weight * KL + perceptual +
    adversarial."""

    recon: Literal["l1", "l2"] = Field("l1", description="Pixel reconstruction loss on the [-1, 1] scale.")
    kl_weight: float = Field(1e-6, ge=0, description="Weight of the KL to N(0, I) (LDM's KL-f8: 1e-6).")
    perceptual_weight: float = Field(
        0.0, ge=0, description="Weight of LPIPS (VGG); > 0 needs its backbone weights locally (lpips_weights or "
        "the torch hub cache). LDM: 1.0."
    )
    lpips_weights: str | None = Field(
        None, description="Local file of torchvision's VGG16 weights for LPIPS (.safetensors or .pth); default: "
        "vgg16-397923af.pth in the torch hub cache (torch.hub.get_dir()/checkpoints)."
    )
    disc_weight: float = Field(0.0, ge=0, description="Weight of the adversarial loss; 0: no discriminator.")
    disc_start: int = Field(0, ge=0, description="Step from which the discriminator trains and the GAN loss counts.")
    disc_loss: Literal["hinge", "vanilla"] = Field("hinge", description="Discriminator loss (taming-transformers).")
    disc_layers: int = Field(3, ge=1, description="Stride-2 layers of the PatchGAN discriminator.")
    disc_channels: int = Field(64, gt=0, description="Channels of the discriminator's first layer.")
    disc_lr: float | None = Field(None, gt=0, description="Discriminator learning rate; default optim.lr.")
    adaptive_weight: bool = Field(
        True, description="Scale the GAN loss by ||grad nll|| / ||grad g_loss|| at the decoder's last layer "
        "(taming-transformers); false: disc_weight alone."
    )


class LossSection(Section):
    likelihood: Literal["bernoulli", "gaussian", "gaussian_learned", "logistic_mixture"] = Field(
        "bernoulli", description="p(x|z): bernoulli (on binarised pixels), gaussian with loss.gaussian_std, "
        "gaussian_learned (per-pixel std), logistic_mixture (discretised, for 8-bit pixels)."
    )
    mixtures: int = Field(10, gt=0, description="Components of the logistic_mixture likelihood.")
    gaussian_std: float = Field(0.1, gt=0, description="Fixed std of the gaussian likelihood, on the [0, 1] scale.")
    beta: float = Field(1.0, ge=0, description="Weight of the KL term (1 is the ELBO).")
    warmup_steps: int = Field(0, ge=0, description="KL warm-up: the weight ramps from 0 to beta over this many steps.")
    free_bits: float = Field(0.0, ge=0, description="Free bits: nats of KL per loss.free_bits_per not penalised.")
    free_bits_per: Literal["dim", "group"] = Field("dim", description="Free bits per latent dimension or group.")
    objective: Literal["elbo", "iwae"] = Field("elbo", description="Train on the ELBO or the IWAE-k bound.")
    iwae_k: int = Field(5, gt=0, description="Importance samples per image of the iwae objective.")
    eval_iwae_k: int = Field(100, gt=0, description="Importance samples of the final val/nll_iwae (papers: 5000).")
    aekl: AeklLossSection = Field(default_factory=AeklLossSection, description="The aekl objective's weights "
                                  "(model.arch aekl only).")
    eval_memory_mb: int = Field(
        1024, gt=0, description="Memory budget per process of the final evaluation's forwards: images and importance "
        "samples go in chunks that fit (vae/objectives/elbo/evaluation.py rows_within); smaller is slower, not "
        "different."
    )


class OptimSection(Section):
    name: Literal["adam", "adamw", "lamb", "muon"] = Field(
        "adam", description="Optimiser; for large global batches, lamb adds a layer-wise trust ratio to Adam and "
        "muon orthogonalises the momentum of weight matrices (AdamW for the rest, at the same lr)."
    )
    lr: float = Field(1e-3, gt=0, description="Learning rate at optim.reference_batch (see optim.lr_scaling).")
    beta1: float = Field(
        0.9, ge=0, lt=1, description="Decay of the gradient's running mean (Adam, AdamW, LAMB; for muon its AdamW "
        "side: the matrices keep Muon's momentum of 0.95)."
    )
    beta2: float = Field(
        0.999, ge=0, lt=1, description="Decay of the squared gradient's running mean; lower (0.95) adapts faster "
        "when a large batch leaves few steps."
    )
    weight_decay: float = Field(0.0, ge=0, description="Weight decay.")
    grad_clip: float | None = Field(None, gt=0, description="Clip the global gradient norm to this; none: no clip.")
    lr_scaling: Literal["none", "linear", "sqrt"] = Field(
        "none", description="Scale lr by the global batch over reference_batch: linear, sqrt, or not at all."
    )
    reference_batch: int = Field(128, gt=0, description="Global batch size at which optim.lr was tuned.")
    warmup_steps: int = Field(0, ge=0, description="Optimiser steps of linear warm-up from 0 to the peak lr.")
    schedule: Literal["constant", "cosine"] = Field("constant", description="After warm-up: constant or cosine.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Cosine floor as a fraction of the peak lr.")


class TrainSection(Section):
    epochs: int = Field(10, gt=0, description="Passes over the training split.")
    batch_size: int = Field(128, gt=0, description="Images per step on each process (global = this x processes).")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimiser step.")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="auto: the accelerate launch setting if it names one, else bf16 on a GPU that "
        "supports it, else fp32. fp16 uses a gradient scaler."
    )
    ema_decay: float | None = Field(
        None, gt=0, lt=1, description="Keep an EMA of the weights (e.g. 0.999) for evaluation and the registry."
    )
    compile: bool = Field(False, description="torch.compile the model (inductor).")
    cuda_graphs: bool = Field(
        False, description="Replay the compiled step as CUDA graphs (torch.compile mode reduce-overhead): fewer "
        "kernel launches per step. Needs train.compile true and a CUDA device; refused on a CPU."
    )
    deferred_step_check: bool | None = Field(
        None, description="Skip non-finite steps on the device and read the flags (and a preemption) one step "
        "late, so an optimiser step needs no host sync; None: on a CUDA device (without fp16's scaler, which skips "
        "on its own), off elsewhere, where a sync costs nothing. The same skips and counts either way."
    )
    channels_last: bool = Field(False, description="Channels-last memory format for conv models.")
    max_nonfinite_steps: int = Field(
        10, gt=0, description="Steps with non-finite gradients are skipped; stop after this many in a row."
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed for weights, sampling and data order (numpy's "
                      "range: 0 to 2**32 - 1).")
    output_dir: Path = Field(Path("runs/default"), description="Checkpoints, resolved config and plots.")
    resume: bool = Field(False, description="Continue from the newest complete checkpoint in output_dir.")
    keep_checkpoints: int = Field(2, gt=0, description="Newest epoch checkpoints kept on disk.")
    log_every: int = Field(20, gt=0, description="Steps between training metric logs (a host sync each time).")
    expected_world_size: int | None = Field(
        None, gt=0, description="Fail fast when the launcher started a different number of processes."
    )
    retries: int = Field(
        2, ge=0, description="Flow retries of a failed or preempted launch; each resumes from the last checkpoint."
    )

    @model_validator(mode="after")
    def _graphs_need_compile(self) -> TrainSection:
        if self.cuda_graphs and not self.compile:
            raise ValueError("train.cuda_graphs replays the compiled step: set train.compile true as well, or "
                             "train.cuda_graphs false")
        return self


class TrackingSection(Section):
    tracking_uri: str | None = Field(
        None, description="MLflow URI; default MLFLOW_TRACKING_URI, else sqlite under the working directory."
    )
    experiment: str = Field("vaepipe", description="MLflow experiment name.")
    run_name: str | None = Field(None, description="MLflow run name.")
    finalize: Literal["register", "evaluate", "none"] = Field(
        "register", description="After training: register (evaluate on the training devices, save the evaluation "
        "and plots in output_dir, log and register the model), evaluate (only save; the flow logs and registers), "
        "none. true and false mean register and none."
    )
    model_name: str | None = Field(None, description="Registered model name; default vae-<source name> "
                                   "(aekl-<source name> for model.arch aekl).")
    system_metrics: bool = Field(
        True, description="Log CPU, memory, disk, network (and GPU, with the gpu extra) figures to the run as "
        "system/* metrics, through MLflow's own monitor on rank 0; sampled every "
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL s (default 10)."
    )

    @field_validator("finalize", mode="before")
    @classmethod
    def _finalize_from_bool(cls, value: Any) -> Any:
        # the field was a bool: presets and scripts still say true / false
        return {True: "register", False: "none"}.get(value, value) if isinstance(value, bool) else value
