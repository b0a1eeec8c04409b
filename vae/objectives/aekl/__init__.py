"""The aekl objective (LDM's autoencoder loss, PatchGAN discriminator, LPIPS) and its evaluation."""

from vae.objectives.aekl import objective  # noqa: F401 - registers `aekl`
