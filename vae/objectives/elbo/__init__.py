"""The ELBO family: the classic VAEs' likelihoods, losses (ELBO, IWAE), evaluation and plots, and their objective."""

from vae.objectives.elbo import objective  # noqa: F401 - registers `elbo`
