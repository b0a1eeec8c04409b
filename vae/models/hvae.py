"""A small hierarchical VAE (the NVAE / VDVAE idea, kept simple): `groups` groups of spatial latents at 1/4
resolution, a bottom-up residual tower feeding a top-down residual path that samples one group at a time.

    bottom-up:  x -> stem -> res -> down -> res -> down -> [res -> e_G] ... [res -> e_1]   (e_1 deepest)
    top-down:   h_0 (learned) -> for g = 1..G: p_g = prior(h), q_g = p_g + posterior(h, e_g), z_g ~ q_g,
                h = res(h + merge(z_g))  -> res -> up -> res -> up -> res -> head

The posterior is parameterised relative to the prior (NVAE's residual normal), so the KL of a group starts
near zero and each group's KL is reported separately.
"""

import math

import torch
from torch import nn

from vae.models.base import VAE, Gaussian, LatentGroup, VAEOutput, check_divisible, reparameterize
from vae.models.blocks import ResBlock, down, stage, up
from vae.models.options import HVAEOptions


class Cell(nn.Module):
    """One latent group of the top-down path: prior from h, posterior from (h, e), merge z back into h."""

    def __init__(self, width: int, z_channels: int, blocks: int):
        super().__init__()
        self.prior = nn.Conv2d(width, 2 * z_channels, 3, padding=1)
        self.posterior = nn.Sequential(
            ResBlock(2 * width), nn.SiLU(), nn.Conv2d(2 * width, 2 * z_channels, 3, padding=1),
        )
        self.merge = nn.Conv2d(z_channels, width, 1)
        self.mix = stage(width, blocks)
        for conv in (self.prior, self.posterior[-1]):  # start at q = p = N(0, I): KL 0, no early blow-ups
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)


class HierarchicalVAE(VAE):
    """`latent_dim` is the channels of each group's latent map (groups x latent_dim x H/4 x W/4 numbers in all);
    `width` the channels of both towers; `blocks` residual blocks per stage. Sides must be divisible by 4."""

    Options = HVAEOptions


    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int = 4, width: int = 64, groups: int = 2,
                 blocks: int = 1, **head):
        super().__init__(image_shape, latent_dim, **head)
        c, h, w = self.image_shape
        check_divisible("hvae", self.image_shape, 4, "resize the images at ingest, or use --model.arch conv (it pads)")
        if groups < 2:
            raise ValueError(f"hvae needs model.groups >= 2 latent groups (got {groups}); for one, use resnet")
        self.z_shape = (latent_dim, h // 4, w // 4)
        self.latent_size = groups * math.prod(self.z_shape)
        self.bottom_up = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1), stage(width, blocks), down(width, width),
            stage(width, blocks), down(width, width),
        )
        self.features = nn.ModuleList(stage(width, blocks) for _ in range(groups))  # e_G first, e_1 last
        self.h0 = nn.Parameter(torch.zeros(1, width, *self.z_shape[1:]))
        self.cells = nn.ModuleList(Cell(width, latent_dim, blocks) for _ in range(groups))
        self.decoder = nn.Sequential(
            stage(width, blocks), up(width, width), stage(width, blocks), up(width, width), stage(width, blocks),
            nn.SiLU(), nn.Conv2d(width, self.head.channels, 3, padding=1),
        )

    def _bottom_up(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Features for each group, top group first; (B, width, H/4, W/4) each."""
        e, out = self.bottom_up(x), []
        for block in self.features:
            e = block(e)
            out.append(e)
        return out[::-1]

    def _top_down(self, features: list[torch.Tensor] | None, batch: int, choose) -> tuple[torch.Tensor, list]:
        """Run the cells; `choose(g, q, p)` gives z_g (q is None without features: sampling from the prior)."""
        h = self.h0.expand(batch, -1, -1, -1)
        groups = []
        for g, cell in enumerate(self.cells):
            p = Gaussian(*cell.prior(h).chunk(2, dim=1))
            q = None
            if features is not None:
                d_mu, d_logvar = cell.posterior(torch.cat([h, features[g]], dim=1)).chunk(2, dim=1)
                q = Gaussian(p.mu + d_mu, p.logvar + d_logvar)
            z = choose(g, q, p)
            groups.append(LatentGroup(z, q, p))
            h = cell.mix(h + cell.merge(z))
        return h, groups

    def forward(self, x: torch.Tensor, samples: int = 1) -> VAEOutput:
        features = self._bottom_up(x)  # once per image; the k samples share it
        if samples > 1:
            features = [e.repeat(samples, 1, 1, 1) for e in features]
        h, groups = self._top_down(features, len(x) * samples, lambda g, q, p: reparameterize(*q))
        return VAEOutput(self.decoder(h), tuple(groups))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whitened posterior along the posterior-mean path: u = (q.mu - p.mu) / p.std, logvar q - p."""
        _, groups = self._top_down(self._bottom_up(x), len(x), lambda g, q, p: q.mu)
        mu = [((gr.q.mu - gr.p.mu) * torch.exp(-0.5 * gr.p.logvar)).flatten(1) for gr in groups]
        logvar = [(gr.q.logvar - gr.p.logvar).flatten(1) for gr in groups]
        return torch.cat(mu, 1), torch.cat(logvar, 1)

    def decode_params(self, u: torch.Tensor) -> torch.Tensor:
        """u (B, latent_size) whitened, groups top first -> decoder output; z_g = p.mu + p.std * u_g."""
        parts = u.view(len(u), len(self.cells), *self.z_shape).unbind(1)
        h, _ = self._top_down(None, len(u), lambda g, q, p: p.mu + torch.exp(0.5 * p.logvar) * parts[g])
        return self.decoder(h)
