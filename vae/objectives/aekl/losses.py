"""The aekl objective as pure functions: LDM's `LPIPSWithDiscriminator`, split so a trainer can call it.

API for the trainer (one generator step, then one discriminator step, each with its own optimiser):

    disc = build_discriminator(cfg.loss.aekl, image_channels)        # None when disc_weight == 0
    lpips = build_lpips(cfg.loss.aekl)                              # None when perceptual_weight == 0
    out = model.autoencode(x)                                       # x in [0, 1]; recon in [-1, 1]
    terms = generator_loss(out, x, cfg.loss.aekl, step, lpips, disc, last_layer=model.last_layer)
    terms.loss.backward()   ... optimiser step on the autoencoder
    d = discriminator_loss(disc, x, out.recon.detach(), cfg.loss.aekl, step)
    d.loss.backward()       ... optimiser step on the discriminator (skip while d.active is False)

`generator_loss` = nll + kl_weight * KL + d_weight * disc_factor * g_loss, with nll the L1/L2 pixel loss plus
perceptual_weight * LPIPS (per pixel, summed over pixels and averaged over the batch as LDM does) and KL summed
over latent elements per image. `adaptive_weight(nll, g_loss, last_layer)` is taming-transformers'
`calculate_adaptive_weight`: ||d nll / d W|| / (||d g_loss / d W|| + 1e-4), clamped to [0, 1e4], detached, at
the decoder's last conv weight W. Under DDP call it on the unwrapped model's `last_layer` (the gradient of a
loss w.r.t. a parameter is local; autograd.grad does not touch .grad, so accumulation is unaffected).

No maintained package ships the PatchGAN discriminator as a module to import (taming-transformers and LDM are
research repositories, not packages), so `NLayerDiscriminator` is hand-written after pix2pix / taming's.
LPIPS comes from the `lpips` package (VGG for the loss, AlexNet for evaluation); its backbone weights are never
downloaded here.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vae.config import AeklLossSection
from vae.models.aekl import AeklOutput

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's IMAGENET1K_V1 weights, the backbone the lpips package uses
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's AlexNet IMAGENET1K_V1: LPIPS(alex), the evaluation's
BACKBONES = {"vgg": VGG16_FILE, "alex": ALEXNET_FILE}
BACKBONE_NAMES = {"vgg": "VGG16", "alex": "AlexNet"}
# the smallest image side each backbone's slices take (AlexNet: an 11x11/4 conv and two 3x3/2 pools; VGG: four pools)
BACKBONE_MIN_SIDE = {"vgg": 16, "alex": 32}


class GeneratorTerms(NamedTuple):
    loss: torch.Tensor  # scalar: what the autoencoder's optimiser minimises
    recon: torch.Tensor  # scalar: mean pixel L1/L2 on the [-1, 1] scale
    perceptual: torch.Tensor  # scalar: mean LPIPS (0 when off)
    kl: torch.Tensor  # scalar: KL per image, summed over latent elements, batch mean
    g_loss: torch.Tensor  # scalar: -D(recon) mean (0 before disc_start or without a discriminator)
    d_weight: torch.Tensor  # scalar: the adaptive weight times disc_weight (0 when the GAN is off)


class DiscriminatorTerms(NamedTuple):
    loss: torch.Tensor  # scalar: hinge or vanilla loss times the disc factor (0 before disc_start)
    logits_real: torch.Tensor  # scalar mean, for logging
    logits_fake: torch.Tensor
    active: bool  # False before disc_start: nothing to step


# ---- discriminator ----------------------------------------------------------------------------------------------

class NLayerDiscriminator(nn.Module):
    """PatchGAN (pix2pix, taming-transformers): conv 4x4/2 layers with BatchNorm, one logit per patch.

    BatchNorm as in the original; under DDP convert with `nn.SyncBatchNorm.convert_sync_batchnorm` if the
    per-rank batch is small. Weights are initialised N(0, 0.02) (convs) and N(1, 0.02) (norm scales) as there.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < layers else 1
            seq += [nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                    nn.BatchNorm2d(channels * mult), nn.LeakyReLU(0.2, True)]
        seq.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*seq)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) on the [-1, 1] scale -> patch logits (B, 1, h, w)."""
        return self.main(x)


def build_discriminator(cfg: AeklLossSection, image_channels: int) -> NLayerDiscriminator | None:
    """The discriminator the section asks for, or None when the adversarial loss is off (disc_weight 0)."""
    if cfg.disc_weight == 0:
        return None
    return NLayerDiscriminator(image_channels, cfg.disc_channels, cfg.disc_layers)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def disc_factor(cfg: AeklLossSection, step: int) -> float:
    """1 from disc_start on, else 0 (taming's adopt_weight)."""
    return 1.0 if step >= cfg.disc_start else 0.0


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """taming-transformers' calculate_adaptive_weight: balance the GAN gradient against the reconstruction's at
    the decoder's last layer. Both losses must still hold their graphs (create_graph is not needed)."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (torch.norm(nll_grad) / (torch.norm(g_grad) + 1e-4)).clamp(0.0, 1e4).detach()


# ---- perceptual -------------------------------------------------------------------------------------------------

def backbone_weights_path(net: str, given: str | Path | None, flag: str, way_out: str = "") -> Path:
    """Where LPIPS's `net` backbone weights are (torchvision's file for "vgg" or "alex"): `given`, else the torch
    hub cache; refuse when absent, saying what to put where (`flag` gives a path; `way_out`: what else to do)."""
    file = BACKBONES[net]
    if given is not None:
        path = Path(given)
        if not path.is_file():
            raise FileNotFoundError(f"{flag.lstrip('-')} {str(path)!r} does not exist: give the path of "
                                    f"torchvision's {BACKBONE_NAMES[net]} weights ({file} or a .safetensors of them)")
        return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / file
    if not cached.is_file():
        raise FileNotFoundError(
            f"LPIPS({net}) needs torchvision's backbone weights and none are on this machine (nothing is downloaded "
            f"at run time): put {file} into the torch hub cache ({cached.parent}; TORCH_HOME moves it), or pass "
            f"its path as {flag}{way_out}")
    return cached


def vgg16_weights_path(cfg: AeklLossSection) -> Path:
    """Where the training loss's LPIPS VGG16 backbone is: loss.aekl.lpips_weights, else the torch hub cache."""
    return backbone_weights_path("vgg", cfg.lpips_weights, "--loss.aekl.lpips_weights",
                                 "; or set --loss.aekl.perceptual_weight 0")


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    """safetensors, or a torch file read with weights_only=True (tensors only: no code runs from the file)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def build_lpips(cfg: AeklLossSection, random_weights: bool = False) -> nn.Module | None:
    """The training loss's frozen LPIPS(VGG) module, or None when perceptual_weight is 0 (and not random_weights).

    Its VGG backbone comes from `vgg16_weights_path` (refused with the fix when absent). random_weights=True builds
    it with random backbone and heads (tests).
    """
    if cfg.perceptual_weight == 0 and not random_weights:
        return None
    return load_lpips("vgg", None if random_weights else vgg16_weights_path(cfg))


def load_lpips(net: str, backbone: Path | None) -> nn.Module:
    """The frozen LPIPS module on `net` ("vgg": the training loss; "alex": the evaluation's, as the LPIPS paper
    recommends for a metric). The lpips package's own linear heads ship inside it; the backbone is torchvision's
    state dict at `backbone` (None: random, for tests)."""
    import warnings

    import lpips

    with warnings.catch_warnings():  # lpips 0.1.4 calls torchvision's deprecated `pretrained=` argument
        warnings.simplefilter("ignore", UserWarning)
        # pretrained=True loads only the package's own non-negative linear heads (read with torch.load, whose
        # default in torch >= 2.6 is weights_only); pnet_rand=True keeps torchvision from downloading the backbone.
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    if backbone is not None:
        state = _load_state(backbone)
        # lpips' backbones hold torchvision's `features` modules split into slices: slice{k}.{i} is features.{i}
        own = {name: f"features.{name.split('.', 1)[1]}" for name in model.net.state_dict()}
        missing = [src for src in own.values() if src not in state]
        if missing:
            raise ValueError(f"{backbone} is not torchvision's {BACKBONE_NAMES[net]} state dict (no {missing[0]})")
        model.net.load_state_dict({name: state[src] for name, src in own.items()})
    model.eval().requires_grad_(False)
    return model


# ---- the two losses ---------------------------------------------------------------------------------------------

def _pixel_loss(kind: str, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    return (x - recon).abs() if kind == "l1" else (x - recon).pow(2)


def generator_loss(out: AeklOutput, x: torch.Tensor, cfg: AeklLossSection, step: int,
                   lpips: nn.Module | None = None, disc: nn.Module | None = None,
                   last_layer: torch.Tensor | None = None) -> GeneratorTerms:
    """The autoencoder's loss at `step` for images x in [0, 1] and their `model.autoencode(x)` output."""
    target = x * 2 - 1
    recon = out.recon.float()
    rec = _pixel_loss(cfg.recon, target, recon)  # (B, C, H, W)
    perceptual = torch.zeros((), device=x.device)
    if cfg.perceptual_weight > 0:
        if lpips is None:
            raise ValueError("loss.aekl.perceptual_weight > 0 needs the LPIPS module: pass build_lpips(cfg)")
        p = lpips(target, recon)  # (B, 1, 1, 1), inputs on the [-1, 1] scale
        perceptual = p.mean()
        rec = rec + cfg.perceptual_weight * p  # LDM adds it per pixel, broadcast
    nll = rec.sum() / rec.shape[0]  # summed over pixels, mean over the batch (LDM)
    mu, logvar = (t.float() for t in out.posterior)
    kl = (0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)).flatten(1).sum(1).mean()
    loss = nll + cfg.kl_weight * kl
    zero = torch.zeros((), device=x.device)
    g_loss, d_weight = zero, zero
    factor = disc_factor(cfg, step)
    if disc is not None and cfg.disc_weight > 0 and factor > 0:
        g_loss = -disc(recon).mean()
        if cfg.adaptive_weight and torch.is_grad_enabled():
            if last_layer is None:
                raise ValueError("loss.aekl.adaptive_weight needs the decoder's last layer: pass model.last_layer")
            d_weight = adaptive_weight(nll, g_loss, last_layer) * cfg.disc_weight
        else:
            d_weight = torch.tensor(cfg.disc_weight, device=x.device)
        loss = loss + d_weight * factor * g_loss
    return GeneratorTerms(loss, _pixel_loss(cfg.recon, target, recon).mean().detach(), perceptual.detach(),
                          kl.detach(), g_loss.detach(), d_weight.detach())


def discriminator_loss(disc: nn.Module, x: torch.Tensor, recon: torch.Tensor, cfg: AeklLossSection,
                       step: int) -> DiscriminatorTerms:
    """The discriminator's loss on real images x in [0, 1] and detached reconstructions on the [-1, 1] scale."""
    logits_real = disc((x * 2 - 1).detach())
    logits_fake = disc(recon.detach().float())
    factor = disc_factor(cfg, step)
    loss = factor * D_LOSSES[cfg.disc_loss](logits_real, logits_fake)
    return DiscriminatorTerms(loss, logits_real.detach().mean(), logits_fake.detach().mean(), factor > 0)
