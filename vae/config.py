"""One typed config tree for a run: source, ingest, data, model, loss, optim, train, tracking.

The same pydantic models are the Prefect deployment's parameter schema. YAML presets live in
`infra/configs/`, read by vae.config_yaml; the command line overrides single fields (`--train.batch_size 512`).
Invalid values stop the run before any work with a `ConfigError` naming the field and what is allowed. The model
section is one section per architecture (a union on `model.arch`), so a field the architecture does not take is
refused; configs saved with the older flat section are upgraded by `upgrade_flat_model`.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vae.config_yaml import YAMLInputError, load_yaml


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the field and the allowed values."""


class _Section(BaseModel):
    # allow_inf_nan=False: a float field refuses inf and nan ("Input should be a finite number"); pydantic
    # accepts both by default, and an infinite lr or beta trains nothing but NaNs.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def check_finite(value: Any, path: str) -> Any:
    """Refuse inf and nan anywhere in free-form data (plugin options, fsspec options), naming the key."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{path} must be a finite number, got {value}")
    if isinstance(value, dict):
        for key, item in value.items():
            check_finite(item, f"{path}.{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            check_finite(item, f"{path}[{i}]")
    return value


class SourceSection(_Section):
    name: str = Field("digits", description="Source plugin (entry point in group 'vaepipe.sources').")
    options: dict[str, Any] = Field(default_factory=dict, description="The plugin's own config fields.")

    @field_validator("options")
    @classmethod
    def _finite_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        return check_finite(options, "source.options")

    @model_validator(mode="after")
    def _check_plugin(self) -> SourceSection:
        from pipeline.sources import validate_options  # registry lookup: unknown names list the valid ones

        validate_options(self.name, self.options, complete=False)  # required ones are the ingest's to check
        return self


class IngestSection(_Section):
    shard_dir: Path | str | None = Field(
        None, description="Where shards go: a local path or an fsspec URL (s3://bucket/prefix); "
        "default data/shards/<source name>."
    )
    samples_per_shard: int = Field(8192, gt=0, description="Images per tar shard (a multiple of block_size, packed).")
    shard_bytes: int = Field(
        256 << 20, gt=0, description="Largest shard in bytes: samples_per_shard is lowered to stay under it (from "
        "the stored size of the first images, for encoded photos)."
    )
    block_size: int = Field(1024, gt=0, description="Images packed into one tar member (packed); the most "
                            "encoded images in one block (encoded-blocks, which holds about 1 MB per block).")
    overwrite: bool = Field(False, description="Re-ingest even when a complete shard directory exists.")
    layout: Literal["auto", "packed", "encoded", "encoded-blocks"] = Field(
        "auto", description="packed: blocks of images per tar member; encoded: one PNG/JPEG per sample; "
        "encoded-blocks: blocks of encoded images (~1 MB) per tar sample, ~1% tar framing instead of ~28% at "
        "256 px; auto: packed up to 16 kB per image (64x64x3), encoded-blocks above."
    )
    image_format: Literal["jpeg", "png", "webp"] = Field(
        "jpeg", description="Encoding of images the encoded layout has to encode (resized, cropped or converted "
        "ones); an image that needs no change keeps its source bytes (JPEG, PNG or WebP) untouched. png: lossless."
    )
    quality: int = Field(95, ge=1, le=100, description="JPEG/WebP quality of encoded images.")
    shards_per_task: int = Field(1, gt=0, description="Shards written by one ingest task (a shard group).")
    on_error: Literal["skip", "fail"] = Field(
        "skip", description="Unusable inputs (corrupt, unreadable, rejected by the rules below): skip and list "
        "them in skipped.jsonl, or stop the ingest."
    )
    size_rule: Literal["reject", "resize", "crop"] = Field(
        "reject", description="Images of another size than the dataset's: reject, resize (stretch), or crop "
        "(scale the shorter side, centre-crop)."
    )
    channel_rule: Literal["reject", "convert"] = Field(
        "reject", description="Images with another channel count (L/RGB/RGBA): reject, or convert."
    )
    image_size: tuple[int, int] | None = Field(
        None, description="Target (H, W); default: the most common size among the inputs (imagefolder reads every "
        "file's header to find it; other sources: the first image's)."
    )
    channels: Literal[1, 3, 4] | None = Field(
        None, description="Target channels; default: the most common channel count (as image_size)."
    )
    max_skip_fraction: float = Field(
        0.01, ge=0, le=1, description="The ingest fails, naming the reasons and skipped.jsonl, when more than this "
        "fraction of the inputs was skipped; with size_rule reject and mixed sizes it refuses before writing."
    )
    runner: Literal["threads", "processes"] = Field(
        "threads", description="Local task runner of the ingest flow (processes: true parallelism, slower start)."
    )
    workers: int | None = Field(
        None, gt=0, description="Local workers, the shard groups written at once; default: Prefect's "
        "PREFECT_TASKS_RUNNER_THREAD_POOL_MAX_WORKERS (PROCESS_POOL with processes) when set, else the CPU count."
    )
    dask_address: str | None = Field(
        None, description="Dask scheduler address (tcp://host:8786): run the shard groups on that cluster."
    )
    retries: int = Field(3, ge=0, description="Retries of a failed shard-group task (a flaky disk, network or store).")
    retry_delay_s: float = Field(
        2.0, ge=0, description="First retry delay in seconds; doubled per retry, with jitter (Prefect's back-off)."
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for a URL shard_dir (e.g. {endpoint_url: ...} for S3)."
    )

    @field_validator("storage_options")
    @classmethod
    def _finite_storage_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        return check_finite(options, "ingest.storage_options")

    @model_validator(mode="before")
    @classmethod
    def _path_or_url(cls, data: Any) -> Any:
        """shard_dir: a URL stays a string (Path would fold its '//'); anything else is a local Path."""
        value = data.get("shard_dir") if isinstance(data, dict) else None
        from pipeline import is_url

        if value is not None and not isinstance(value, Path) and not is_url(value):
            data = {**data, "shard_dir": Path(value)}
        return data

    # samples_per_shard must be a multiple of block_size only for packed shards, which the layout decides once the
    # image size is known: the ingest's plan checks it (pipeline.ingest._shard_sizes), before any shard is written


class DataSection(_Section):
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


class _ArchSection(_Section):
    """Fields common to every architecture. Each subclass holds exactly its constructor's options (a test checks
    them against vae.models), so a field another architecture takes is refused instead of ignored."""

    objective: ClassVar[str] = "elbo"  # what the trainer minimises for this architecture (vae/objective.py)
    name_prefix: ClassVar[str] = "vae"  # the default registered name is <prefix>-<source name>
    arch: str = Field(description="Architecture from vae.models (each subclass narrows it to its own name).")
    latent_dim: int = Field(2, gt=0, description="Size of z (2 gives the manifold plot).")

    @model_validator(mode="before")
    @classmethod
    def _own_fields_only(cls, data: Any) -> Any:
        """Name the architecture's fields, and which architectures take the stray one, not just 'extra input'."""
        if not isinstance(data, dict):
            return data
        arch = get_args(cls.model_fields["arch"].annotation)[0]
        stray = [name for name in data if name not in cls.model_fields]
        if stray:
            takers = {name: [a for a, section in MODEL_SECTIONS.items() if name in section.model_fields]
                      for name in stray}
            where = "; ".join(f"model.{name} is taken by {', '.join(takers[name]) or 'no architecture'}"
                              for name in stray)
            raise ValueError(f"model.arch {arch!r} takes only {', '.join(cls.model_fields)}: remove "
                             f"{', '.join('model.' + name for name in stray)} ({where})")
        return data


class ConvSection(_ArchSection):
    arch: Literal["conv"] = Field("conv", description="The classic two-conv network; pads any image size.")


class MLPSection(_ArchSection):
    arch: Literal["mlp"] = Field(description="Fully connected encoder and decoder.")
    hidden_dim: int = Field(400, gt=0, description="Hidden width.")
    hidden_layers: int = Field(1, gt=0, description="Hidden layers on each side.")


class ResNetSection(_ArchSection):
    arch: Literal["resnet"] = Field(description="Residual conv encoder and decoder, dense latent.")
    width: int = Field(32, gt=0, description="Base channels.")
    depth: int = Field(2, gt=0, description="Stride-2 stages each side (image sides divisible by 2**depth).")
    blocks: int = Field(1, gt=0, description="Residual blocks per stage.")


class HVAESection(_ArchSection):
    arch: Literal["hvae"] = Field(description="Hierarchical VAE with groups of spatial latents.")
    latent_dim: int = Field(2, gt=0, description="Channels of each latent group (H/4 x W/4 spatial latents).")
    width: int = Field(32, gt=0, description="Base channels.")
    groups: int = Field(2, ge=2, description="Groups of latents in the hierarchy.")
    blocks: int = Field(1, gt=0, description="Residual blocks per stage.")


class AeklSection(_ArchSection):
    objective: ClassVar[str] = "aekl"  # LDM's loss with a PatchGAN discriminator (vae/objective.py)
    name_prefix: ClassVar[str] = "aekl"  # its versions compete on PSNR, never with the ELBO family's NLL
    arch: Literal["aekl"] = Field(description="diffusers' AutoencoderKL (the VAE of SD/SDXL/FLUX): spatial latents "
                                  "(latent_dim, H/f, W/f), exportable as a diffusers folder.")
    latent_dim: int = Field(4, gt=0, description="Latent channels: 4 (SD, SDXL) or 16 (SD3, FLUX).")
    channels: tuple[int, ...] = Field(
        (128, 256, 512, 512), description="Channels per level, full resolution first; 3, 4 or 5 levels give the "
        "down-sampling factor f4, f8 or f16 (SD's VAE: 128 256 512 512, f8)."
    )
    layers_per_block: int = Field(2, gt=0, description="Resnet layers per level (SD's VAE: 2).")
    norm_groups: int = Field(32, gt=0, description="GroupNorm groups; divides every entry of model.channels.")
    attention: bool = Field(True, description="Self-attention in the mid block (as SD's VAE).")
    pretrained: str | None = Field(
        None, description="A local diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model"
        ".safetensors) to start from; its architecture fills the fields above (a given one must agree)."
    )
    train_encoder: bool = Field(
        True, description="false: freeze encoder and quant_conv and fine-tune the decoder only; the latents stay "
        "bit-equal (the SD VAE ft-MSE / ft-EMA recipe)."
    )

    @model_validator(mode="before")
    @classmethod
    def _from_pretrained(cls, data: Any) -> Any:
        """Fill the architecture from the pretrained folder's config.json; refuse a given value that disagrees."""
        if not isinstance(data, dict) or data.get("pretrained") in (None, ""):
            return data
        from vae.models.aekl import FOLDER_FIELDS, folder_config, section_from_folder

        if not Path(data["pretrained"]).exists() and FOLDER_FIELDS <= set(data):
            return data  # a saved config (meta.json) read where the folder is not: it was filled in already
        folder = section_from_folder(folder_config(data["pretrained"]))
        clash = [f"model.{k} {data[k]!r} (the folder has {v!r})" for k, v in folder.items()
                 if k in data and (list(data[k]) if isinstance(data[k], tuple | list) else data[k]) != v]
        if clash:
            raise ValueError(f"model.pretrained {data['pretrained']!r} disagrees with {', '.join(clash)}: leave "
                             "those fields unset to take the folder's values")
        return {**data, **folder}

    @model_validator(mode="after")
    def _levels(self) -> AeklSection:
        if len(self.channels) not in (3, 4, 5):
            raise ValueError(f"model.channels has {len(self.channels)} levels: give 3, 4 or 5 (f4, f8, f16)")
        if any(n <= 0 or n % self.norm_groups for n in self.channels):
            raise ValueError(f"model.norm_groups {self.norm_groups} must divide every entry of model.channels "
                             f"{list(self.channels)}")
        return self


# model.arch -> its section (one per architecture in vae.models.MODELS; a test keeps the two equal). Every arch
# but the default names itself (`arch` required): a JSON-schema validator, such as the Prefect server's check
# of deployment parameters, can then tell which section a mapping without `arch` is (the default, conv).
MODEL_SECTIONS: dict[str, type[_ArchSection]] = {
    "aekl": AeklSection, "conv": ConvSection, "hvae": HVAESection, "mlp": MLPSection, "resnet": ResNetSection,
}
DEFAULT_ARCH = "conv"
ModelSection = Annotated[Union[tuple(MODEL_SECTIONS.values())], Field(discriminator="arch")]  # noqa: UP007

# The single model section of configs saved before the union (meta.json, config.yaml): every architecture's
# fields, with these defaults; `upgrade_flat_model` turns it into the section of its arch.
FLAT_MODEL_DEFAULTS = {"latent_dim": 2, "hidden_dim": 400, "hidden_layers": 1, "width": 32, "depth": 2, "blocks": 1,
                       "groups": 2}


def upgrade_flat_model(section: dict[str, Any]) -> dict[str, Any]:
    """An old flat model section -> the section of its arch, without the fields that arch does not take.

    The old trainer passed an architecture only the fields its constructor names (trainer.model_options), so
    dropping the others describes exactly the model that was trained. One set to a non-default value had no
    effect then either; it is dropped with a warning rather than stranding the checkpoint.
    """
    arch = section.get("arch", DEFAULT_ARCH)
    if arch not in MODEL_SECTIONS:
        return section  # validation names the valid architectures
    own = MODEL_SECTIONS[arch].model_fields
    ignored = {k: v for k, v in section.items() if k not in own and v != FLAT_MODEL_DEFAULTS.get(k)}
    if ignored:
        warnings.warn(f"saved config: model.arch {arch!r} never took {ignored} (the old trainer ignored them); "
                      "dropped", stacklevel=2)
    return {k: v for k, v in section.items() if k in own}


class AeklLossSection(_Section):
    """The aekl objective (vae/aekl_losses.py): reconstruction + kl_weight * KL + perceptual + adversarial."""

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


class LossSection(_Section):
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
        "samples go in chunks that fit (vae/evaluate.py rows_within); smaller is slower, not different."
    )


class OptimSection(_Section):
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


class TrainSection(_Section):
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


class TrackingSection(_Section):
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


class RunConfig(_Section):
    """Everything one training run needs."""

    source: SourceSection = Field(default_factory=SourceSection)
    ingest: IngestSection = Field(default_factory=IngestSection)
    data: DataSection = Field(default_factory=DataSection)
    model: ModelSection = Field(default_factory=ConvSection, description="The architecture and its options; "
                                "one section per model.arch, each with its own fields.")
    loss: LossSection = Field(default_factory=LossSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    train: TrainSection = Field(default_factory=TrainSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)

    @model_validator(mode="before")
    @classmethod
    def _model_section(cls, data: Any) -> Any:
        """A model section without `arch` is the default architecture's; an old flat one is upgraded."""
        model = data.get("model") if isinstance(data, dict) else None
        if not isinstance(model, dict):
            return data
        if set(model) == {"arch", *FLAT_MODEL_DEFAULTS}:
            model = upgrade_flat_model(model)
        return {**data, "model": {"arch": DEFAULT_ARCH, **model}}

    @model_validator(mode="after")
    def _check_combinations(self) -> RunConfig:
        """Combinations that would train without error but measure nonsense, refused before any work."""
        loss = self.loss

        def on(name: str) -> bool:  # the data section's binarize / dequantize switches (bool or a mode name)
            return getattr(self.data, name, None) not in (None, False, 0, "none", "no", "off")

        if loss.likelihood == "logistic_mixture" and on("binarize"):
            raise ValueError("loss.likelihood 'logistic_mixture' models 8-bit pixels, but data.binarize makes them "
                             "0/1: use --loss.likelihood bernoulli, or turn data.binarize off")
        if loss.likelihood == "logistic_mixture" and on("dequantize"):
            raise ValueError("loss.likelihood 'logistic_mixture' is discrete and needs the exact 8-bit values: turn "
                             "data.dequantize off (dequantise only for a gaussian likelihood)")
        if self.model.arch != "aekl" and loss.aekl != AeklLossSection():
            raise ValueError(f"loss.aekl configures the aekl objective, but model.arch is {self.model.arch!r}: "
                             "remove the loss.aekl fields, or use --model.arch aekl")
        if self.model.arch == "aekl" and loss.likelihood not in ("bernoulli", "gaussian"):
            raise ValueError(f"model.arch 'aekl' decodes images (one value per channel), so loss.likelihood "
                             f"{loss.likelihood!r} cannot be used: set --loss.likelihood gaussian or bernoulli")
        if loss.objective == "iwae" and (loss.beta != 1 or loss.warmup_steps or loss.free_bits):
            raise ValueError("loss.objective 'iwae' is the bound itself: set loss.beta 1, loss.warmup_steps 0 and "
                             "loss.free_bits 0, or use --loss.objective elbo")
        return self

    @property
    def shard_dir(self) -> Path:
        return self.ingest.shard_dir or Path("data/shards") / self.source.name

    @property
    def model_name(self) -> str:
        return self.tracking.model_name or f"{type(self.model).name_prefix}-{self.source.name}"


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        # pydantic puts a union's tag in the location (model.mlp.width): the user wrote model.width
        union = e["loc"] and e["loc"][0] in RunConfig.model_fields and RunConfig.model_fields[e["loc"][0]].discriminator
        loc = [str(p) for i, p in enumerate(e["loc"]) if not (union and i == 1)]
        if e["type"] == "union_tag_invalid":  # an unknown model.arch
            loc.append(e["ctx"]["discriminator"].strip("'"))
            lines.append(f"{'.'.join(loc)}: Input should be {e['ctx']['expected_tags']} (got {e['ctx']['tag']!r})")
        elif e["type"] == "value_error":  # our own validators' messages name the field and the fix
            message, field = str(e["ctx"]["error"]), ".".join(loc)
            lines.append(message if message.startswith(field) else f"{field}: {message}")
        else:
            lines.append(f"{'.'.join(loc)}: {e['msg']} (got {e.get('input')!r})")
    return "invalid config: " + "; ".join(lines)


def validate(data: dict[str, Any]) -> RunConfig:
    """Build a RunConfig from plain data, turning pydantic's errors into a one-line ConfigError."""
    from pipeline.errors import SourceError

    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err)) from None
    except SourceError as err:
        raise ConfigError(str(err)) from None


def _fields(annotation: Any) -> dict[str, Any] | None:
    """The fields of a section annotation: a model's own, or for a union of sections (model) every member's."""
    members = get_args(annotation) or (annotation,)
    if not all(isinstance(m, type) and issubclass(m, BaseModel) for m in members):
        return None
    return {name: field for m in members for name, field in m.model_fields.items()}


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set data['a']['b']['c'] for 'a.b.c', checking each name against the config tree.

    Under model, a name is checked against every architecture's fields: the arch may come from a preset or a
    later override, and validation then refuses a field the chosen one does not take, naming its fields.
    """
    *parents, leaf = dotted.split(".")
    node, fields = data, _fields(RunConfig)
    for depth, name in enumerate(parents):
        if fields is not None:
            if name not in fields:
                raise ConfigError(f"unknown config field --{dotted}: valid here are {', '.join(fields)}")
            fields = _fields(fields[name].annotation)
        node = node.setdefault(name, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--{'.'.join(parents[: depth + 1])} is a value, not a section")
    if fields is not None and leaf not in fields:
        raise ConfigError(f"unknown config field --{dotted}: valid here are {', '.join(fields)}")
    node[leaf] = value


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """['--train.epochs', '3', '--model.arch=mlp'] -> nested dict; values are parsed as YAML scalars."""
    data: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"expected --section.field VALUE, got {token!r}")
        if "=" in token:
            key, raw = token[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(tokens):
                raise ConfigError(f"{token} needs a value")
            key, raw = token[2:], tokens[i + 1]
            i += 2
        if "." not in key:
            raise ConfigError(f"--{key}: config fields are written section.field, e.g. --train.epochs")
        try:
            value = load_yaml(raw, f"--{key}")
        except YAMLInputError as err:
            raise ConfigError(str(err)) from None
        _set_dotted(data, key, value)
    return data


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; `override` wins."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Preset YAML (optional) + command-line overrides -> a validated RunConfig."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            presets = sorted(p.name for p in Path("infra/configs").glob("*.yaml"))
            raise ConfigError(f"config file {path} does not exist (presets in infra/configs: {presets})")
        try:
            data = load_yaml(path.read_text(), f"config file {path}") or {}
        except YAMLInputError as err:
            raise ConfigError(str(err)) from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    return validate(merge(data, parse_overrides(overrides or [])))


def with_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """`cfg` with command-line style overrides (`["--train.epochs", "5"]`) applied, validated again."""
    return validate(merge(cfg.model_dump(mode="json"), parse_overrides(overrides)))


def _field_line(section: str, name: str, field: Any, indent: str = "  ") -> str:
    annotation = getattr(field.annotation, "__name__", None) or str(field.annotation).replace("typing.", "")
    default = field.get_default(call_default_factory=True)
    return f"{indent}--{section}.{name} ({annotation}, default {default!r}): {field.description}"


def field_help() -> str:
    """Every config field with its type, default and description: the body of `--help`.

    A union of sections (model) is listed per member: each architecture with the fields it takes.
    """
    lines = []
    for section, info in RunConfig.model_fields.items():
        lines.append(f"{section}:")
        members = get_args(info.annotation)
        if not members:
            lines += [_field_line(section, name, field) for name, field in info.annotation.model_fields.items()]
            continue
        tag = info.discriminator
        default = info.get_default(call_default_factory=True)
        choices = " | ".join(get_args(m.model_fields[tag].annotation)[0] for m in members)
        lines.append(f"  --{section}.{tag} ({choices}, default {getattr(default, tag)!r}): {info.description}")
        for member in members:
            lines.append(f"  {section}.{tag} {get_args(member.model_fields[tag].annotation)[0]}: "
                         f"{member.model_fields[tag].description}")
            lines += [_field_line(section, name, field, "    ") for name, field in member.model_fields.items()
                      if name != tag]
    return "\n".join(lines)


def dump(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def flatten(cfg: RunConfig) -> dict[str, str]:
    """Dotted key -> string value, for MLflow params."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = str(value)

    walk("", cfg.model_dump(mode="json"))
    return out
