"""The options of each architecture as a typed section: what its constructor takes, with a description per field.

Each model class names its section (`ConvVAE.Options = ConvOptions`) and `register_model` checks it is the one in
`SECTIONS`; the run config builds its `model` union from `SECTIONS` instead of keeping a second list. This module
imports pydantic only, so the config (and `vaepipe --help`) reads the sections without torch.

Owns: the section base (`ArchOptions`), the sections and their registry. Imports nothing of the project.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ArchOptions(BaseModel):
    """Fields common to every architecture. A subclass holds exactly its constructor's options, so a field another
    architecture takes is refused instead of ignored, and the refusal names the architectures that take it."""

    # allow_inf_nan=False: an infinite width or std is refused ("Input should be a finite number")
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

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
            takers = {name: [a for a, section in SECTIONS.items() if name in section.model_fields] for name in stray}
            where = "; ".join(f"model.{name} is taken by {', '.join(takers[name]) or 'no architecture'}"
                              for name in stray)
            raise ValueError(f"model.arch {arch!r} takes only {', '.join(cls.model_fields)}: remove "
                             f"{', '.join('model.' + name for name in stray)} ({where})")
        return data

    def constructor_options(self) -> dict[str, Any]:
        """The keyword arguments of the architecture's constructor (everything but arch and latent_dim)."""
        return self.model_dump(exclude={"arch", "latent_dim"})


class ConvOptions(ArchOptions):
    arch: Literal["conv"] = Field("conv", description="The classic two-conv network; pads any image size.")


class MLPOptions(ArchOptions):
    arch: Literal["mlp"] = Field(description="Fully connected encoder and decoder.")
    hidden_dim: int = Field(400, gt=0, description="Hidden width.")
    hidden_layers: int = Field(1, gt=0, description="Hidden layers on each side.")


class ResNetOptions(ArchOptions):
    arch: Literal["resnet"] = Field(description="Residual conv encoder and decoder, dense latent.")
    width: int = Field(32, gt=0, description="Base channels.")
    depth: int = Field(2, gt=0, description="Stride-2 stages each side (image sides divisible by 2**depth).")
    blocks: int = Field(1, gt=0, description="Residual blocks per stage.")


class HVAEOptions(ArchOptions):
    arch: Literal["hvae"] = Field(description="Hierarchical VAE with groups of spatial latents.")
    latent_dim: int = Field(2, gt=0, description="Channels of each latent group (H/4 x W/4 spatial latents).")
    width: int = Field(32, gt=0, description="Base channels.")
    groups: int = Field(2, ge=2, description="Groups of latents in the hierarchy.")
    blocks: int = Field(1, gt=0, description="Residual blocks per stage.")


PICKLES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")


def refuse_pickle(pretrained: str) -> None:
    """A ValueError with the fix for weights in a pickle (.ckpt, .bin, .pt, .pth), judged by the name alone."""
    suffix = Path(pretrained).suffix.lower()
    if suffix in PICKLES:
        raise ValueError(f"model.pretrained {pretrained!r} is a pickle ({suffix}): loading one runs code from the "
                         "file, so vaepipe does not. Use the release's .safetensors file, or convert this one "
                         "where you trust it: `safetensors.torch.save_file(torch.load(PATH, weights_only=True)"
                         "['state_dict'], 'vae.safetensors')` (a VAE-only file may hold the tensors at the top level)")



class AeklOptions(ArchOptions):
    """The aekl section (`AEKL.Options`). `pretrained` is resolved by `vae.models.aekl.with_pretrained` where the
    model is built, never while the config is validated: validating reads no disk."""

    name_prefix = "aekl"  # its versions compete on PSNR, never with the ELBO family's NLL
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
    quant_conv: bool = Field(True, description="The 1x1 convolutions around the latent (quant_conv, "
                             "post_quant_conv) of SD's and SDXL's VAE; FLUX's and SD3's have none.")
    pretrained: str | None = Field(
        None, description="Weights to start from: a diffusers AutoencoderKL folder (config.json + "
        "diffusion_pytorch_model.safetensors), a Hugging Face repo id in the local cache (stabilityai/sd-vae-ft-mse; "
        "never downloaded), or one .safetensors file in the original LDM (SD, SDXL) or BFL (FLUX ae) layout. Its "
        "architecture fills the fields above (a given one must agree; a file does not fix norm_groups)."
    )
    pretrained_subfolder: str | None = Field(
        None, description="The folder inside model.pretrained (a repo id or a local folder) that holds the VAE: "
        "vae for a pipeline (stabilityai/stable-diffusion-xl-base-1.0, black-forest-labs/FLUX.1-dev)."
    )
    train_encoder: bool = Field(
        True, description="false: freeze encoder and quant_conv and fine-tune the decoder only; the latents stay "
        "bit-equal (the SD VAE ft-MSE / ft-EMA recipe)."
    )

    @model_validator(mode="after")
    def _levels(self) -> AeklOptions:
        if len(self.channels) not in (3, 4, 5):
            raise ValueError(f"model.channels has {len(self.channels)} levels: give 3, 4 or 5 (f4, f8, f16)")
        if any(n <= 0 or n % self.norm_groups for n in self.channels):
            raise ValueError(f"model.norm_groups {self.norm_groups} must divide every entry of model.channels "
                             f"{list(self.channels)}")
        if self.pretrained_subfolder and not self.pretrained:
            raise ValueError("model.pretrained_subfolder names a folder inside model.pretrained: give "
                             "model.pretrained too (a repo id or a local folder)")
        if self.pretrained:
            refuse_pickle(self.pretrained)  # from the name alone: validation reads no disk
        return self


def _arch(section: type[ArchOptions]) -> str:
    return get_args(section.model_fields["arch"].annotation)[0]


SECTIONS: dict[str, type[ArchOptions]] = {
    _arch(s): s for s in (AeklOptions, ConvOptions, HVAEOptions, MLPOptions, ResNetOptions)
}  # model.arch -> its section
