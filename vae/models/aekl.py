"""`aekl`: diffusers' `AutoencoderKL` (the VAE under SD, SDXL, SD3 and FLUX pipelines), wrapped, not copied.

The wrapped module is `self.vae`, a plain `diffusers.AutoencoderKL`, so a trained model saves as a diffusers
folder that `AutoencoderKL.from_pretrained` loads (vae/registry/diffusers.py). Conventions at the boundary:

- Outside (the project's contract, vae/models/__init__.py): images in [0, 1]; inside diffusers: [-1, 1].
- The latent is SPATIAL: (B, latent_dim, H / f, W / f) with f = 2 ** (len(channels) - 1) (f4, f8, f16).
  `encode_latents` / `decode_latents` work on that map, unscaled (a diffusion model multiplies by the exported
  `scaling_factor` after subtracting `shift_factor`). The contract's `encode` / `decode` flatten it to
  (B, latent_size) so the project's evaluation and plots work unchanged; `latent_shape` undoes that. Like
  `AutoencoderKL`, the spatial methods take any H and W that f divides, not only the training size, and `tile`
  switches on diffusers' tiling for images larger than a tile (the registered model's `tile_size` limit).
- `forward(x, samples)` returns a `VAEOutput` whose params are the logits of the pixel means (one per image
  channel), so the bernoulli and gaussian heads' means are exactly diffusers' (out + 1) / 2. Heads that need
  more decoder channels (gaussian_learned, logistic_mixture) are refused: the exported decoder must emit images.
- `autoencode(x)` is what the aekl objective (vae/objectives/aekl/) trains on: the reconstruction in [-1, 1] and
  the posterior, on diffusers' own scale.

`pretrained` is a diffusers folder, a Hugging Face repo id from the local cache, or one original-layout
.safetensors file (vae/models/pretrained.py): its architecture wins, and a section value that disagrees is refused
(`with_pretrained` fills the section where training builds the model, so the resolved config describes the model).
`train_encoder=False` freezes encoder and quant_conv (decoder-only fine-tuning, as the SD VAE ft-MSE / ft-EMA
releases did): their weights, hence the latents, stay bit-equal.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from vae.models.base import VAE, Gaussian, LatentGroup, VAEOutput, check_divisible, reparameterize
from vae.models.options import AeklOptions
from vae.models.pretrained import locate

# diffusers is imported where a model is built, not here: vae.models (and so every logged MLflow model's code)
# imports this file, and the other architectures should not need diffusers, nor pay its ~2 s import.

FACTORS = (4, 8, 16)  # f = 2 ** (levels - 1): 3, 4 or 5 entries in `channels`
IMAGE_HEADS = ("bernoulli", "gaussian")  # heads whose decoder output is one value per image channel
LOGIT_EPS = 1e-6  # pixel means are clamped to [eps, 1 - eps] before the logit, so params stay finite


class AeklOutput(NamedTuple):
    recon: torch.Tensor  # (B, C, H, W) in [-1, 1] (unclamped): the decoder's image, diffusers' scale
    posterior: Gaussian  # (B, latent_dim, H / f, W / f) mean and log-variance (diffusers clamps it to [-30, 20])
    z: torch.Tensor  # the latent that was decoded: a sample of the posterior, or its mean


def _plain(value):
    return list(value) if isinstance(value, tuple | list) else value


def with_pretrained(options: AeklOptions) -> AeklOptions:
    """`options` with the architecture of its `pretrained` weights filled in (the resolved config then describes
    the model that trains); a field the user set to another value than the weights' is refused, naming both."""
    if options.pretrained in (None, ""):
        return options
    source = locate(options.pretrained, options.pretrained_subfolder, options.norm_groups)
    fixed = source.section()
    clash = [f"model.{k} {_plain(getattr(options, k))!r} (the {source.noun} has {v!r})" for k, v in fixed.items()
             if k in options.model_fields_set and _plain(getattr(options, k)) != v]
    if clash:
        raise ValueError(f"model.pretrained {options.pretrained!r} disagrees with {', '.join(clash)}: leave those "
                         f"fields unset to take the {source.noun}'s values")
    return AeklOptions.model_validate({**options.model_dump(), **fixed})


class AEKL(VAE):
    """diffusers `AutoencoderKL` for images (C, H, W), C 1 or 3, H and W multiples of f (need not be equal).

    `channels` per level (first is the full-resolution level), `layers_per_block` resnet layers per level,
    `latent_dim` latent channels (4: SD/SDXL, 16: SD3/FLUX), `norm_groups` GroupNorm groups (divides every
    entry of channels), `attention` the mid-block self-attention of SD's VAE.
    """

    Options = AeklOptions

    @classmethod
    def resolve_options(cls, options: AeklOptions) -> AeklOptions:
        return with_pretrained(options)
    requirements = ("diffusers",)  # beyond torch: what its logged MLflow model needs installed

    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int = 4,
                 channels: tuple[int, ...] = (128, 256, 512, 512), layers_per_block: int = 2, norm_groups: int = 32,
                 attention: bool = True, quant_conv: bool = True, pretrained: str | None = None,
                 pretrained_subfolder: str | None = None, train_encoder: bool = True, likelihood: str = "gaussian",
                 mixtures: int = 10, gaussian_std: float = 0.1):
        if likelihood not in IMAGE_HEADS:
            raise ValueError(f"model.arch 'aekl' decodes images (one value per channel, diffusers' convention), so "
                             f"loss.likelihood {likelihood!r} cannot be used: set --loss.likelihood gaussian "
                             f"(or bernoulli); the aekl objective itself is vae/objectives/aekl/losses.py")
        super().__init__(image_shape, latent_dim, likelihood=likelihood, mixtures=mixtures, gaussian_std=gaussian_std)
        c, h, w = self.image_shape
        if c not in (1, 3):
            raise ValueError(f"model.arch 'aekl' takes images with 1 or 3 channels, got {c}: set "
                             "--ingest.channels 1 or 3 (channel_rule convert)")
        channels = tuple(int(n) for n in channels)
        if len(channels) - 1 not in (2, 3, 4):
            raise ValueError(f"model.channels has {len(channels)} levels, a down-sampling factor of "
                             f"{2 ** (len(channels) - 1)}: give 3, 4 or 5 levels (f4, f8, f16)")
        if any(n % norm_groups for n in channels):
            raise ValueError(f"model.norm_groups {norm_groups} must divide every entry of model.channels {channels}")
        self.factor = 2 ** (len(channels) - 1)
        check_divisible("aekl", self.image_shape, self.factor, f"crop or resize to multiples of {self.factor} "
                        "(--data.crop_size, --ingest.size_rule), or use fewer levels in model.channels")
        options = dict(in_channels=c, out_channels=c, block_out_channels=channels, layers_per_block=layers_per_block,
                       latent_channels=latent_dim, norm_num_groups=norm_groups, mid_block_add_attention=attention,
                       use_quant_conv=quant_conv, use_post_quant_conv=quant_conv,
                       down_block_types=("DownEncoderBlock2D",) * len(channels),
                       up_block_types=("UpDecoderBlock2D",) * len(channels), sample_size=max(h, w))
        from diffusers import AutoencoderKL

        if pretrained is None:
            self.vae = AutoencoderKL(**options)
        else:
            source = locate(pretrained, pretrained_subfolder, norm_groups)
            source.check(options)
            self.vae = source.load()
        self.latent_shape = (latent_dim, h // self.factor, w // self.factor)
        self.latent_size = math.prod(self.latent_shape)
        self.train_encoder = train_encoder
        if not train_encoder:
            for module in self.frozen():
                module.requires_grad_(False)

    def frozen(self) -> list[nn.Module]:
        """The modules decoder-only fine-tuning freezes (empty while the encoder trains)."""
        if getattr(self, "train_encoder", True):
            return []
        return [m for m in (self.vae.encoder, self.vae.quant_conv) if m is not None]

    def train(self, mode: bool = True) -> AEKL:
        super().train(mode)
        for module in self.frozen():  # frozen parts stay in eval mode (no dropout); their output is fixed
            module.eval()
        return self

    def tile(self, tile_size: int) -> None:
        """Encode and decode images with a side over `tile_size` px tile by tile, with diffusers' own tiling
        (`enable_tiling`: tiles of that side, overlapping by a quarter and blended), so memory is bounded by the
        tile, not the image; 0 runs whole images always. Tiled latents differ a little from whole ones (a tile's
        GroupNorm statistics and attention see the tile only); an image within one tile is not tiled at all."""
        if tile_size == 0:
            self.vae.disable_tiling()
            return
        # diffusers steps by 3/4 of a tile and crops 3/4 of a latent tile: both are whole latent pixels, and the
        # latent has H / f rows, only when a tile is a multiple of 4 f
        if tile_size < 0 or tile_size % (4 * self.factor):
            raise ValueError(f"tile_size {tile_size} must be 0 (never tile) or a multiple of 4 f = {4 * self.factor} "
                             "(tiles overlap by a quarter, which must fall on whole latent pixels)")
        self.vae.enable_tiling()
        self.vae.tile_sample_min_size = tile_size  # diffusers' own knobs; its default is the config's sample_size
        self.vae.tile_latent_min_size = tile_size // self.factor

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's last weight: taming-transformers' adaptive GAN weight takes gradient norms here."""
        return self.vae.decoder.conv_out.weight

    def posterior(self, x: torch.Tensor) -> Gaussian:
        """x (B, C, H, W) in [0, 1] -> q(z|x): mean and log-variance (B, latent_dim, H / f, W / f)."""
        dist = self.vae.encode(x * 2 - 1).latent_dist
        return Gaussian(dist.mean, dist.logvar)

    def autoencode(self, x: torch.Tensor, sample: bool = True) -> AeklOutput:
        """x in [0, 1] -> the reconstruction in [-1, 1] and the posterior: the aekl objective's inputs."""
        q = self.posterior(x)
        z = reparameterize(*q) if sample else q.mu
        return AeklOutput(self.vae.decode(z).sample, q, z)

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """x in [0, 1] -> the posterior mean (B, latent_dim, H / f, W / f), unscaled (what diffusers' encode gives)."""
        return self.posterior(x).mu

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """A spatial latent (unscaled) -> images in [0, 1]."""
        return (self.vae.decode(z).sample.float() + 1).div(2).clamp(0, 1)

    # The project's contract: flat latents, logits of pixel means as the head's params.
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.posterior(x)
        return mu.flatten(1), logvar.flatten(1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Flat z (B, latent_size) -> images in [0, 1], exactly diffusers' (out + 1) / 2 clamped."""
        return self.decode_latents(z.reshape(len(z), *self.latent_shape))

    def decode_params(self, z: torch.Tensor) -> torch.Tensor:
        images = self.decode_latents(z.reshape(len(z), *self.latent_shape))
        return torch.logit(images, eps=LOGIT_EPS)

    def forward(self, x: torch.Tensor, samples: int = 1, autoencode: bool = False) -> VAEOutput | AeklOutput:
        """The contract's VAEOutput; autoencode=True: `autoencode(x)` instead, so that the aekl objective's
        forward goes through the model's wrappers (DDP syncs gradients only for a forward it sees)."""
        if autoencode:
            return self.autoencode(x)
        mu, logvar = self.encode(x)
        if samples > 1:
            mu, logvar = mu.repeat(samples, 1), logvar.repeat(samples, 1)
        z = reparameterize(mu, logvar)
        return VAEOutput(self.decode_params(z), (LatentGroup(z, Gaussian(mu, logvar), Gaussian(
            torch.zeros_like(mu), torch.zeros_like(mu))),))
