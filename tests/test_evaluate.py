"""Evaluation: the IWAE bound, chunking, active units, bits/dim, MIG, and the pictures."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from vae import plots
from vae.config import LossSection
from vae.evaluate import evaluate, iwae_log_likelihood, mutual_information_gap
from vae.likelihoods import bits_per_dim
from vae.losses import elbo_terms, training_loss
from vae.models import MODELS, build_model


@pytest.fixture(scope="module")
def digits():
    """The bundled 8x8 digits as uint8 (N, 1, 8, 8), and one fixed binarisation of them as floats."""
    images = torch.from_numpy(load_digits().images).float().div(16).unsqueeze(1)
    torch.manual_seed(0)
    return (images * 255).round().to(torch.uint8), torch.bernoulli(images)


@pytest.fixture(scope="module")
def trained(digits):
    """A small MLP VAE trained for 200 steps on binarised digits (a few seconds on a CPU)."""
    _, x = digits
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 4, hidden_dim=32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(200):
        batch = x[torch.randint(0, len(x), (64,))]
        loss = training_loss(model, batch, LossSection(), step).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_iwae_bound_rises_with_k_and_stays_above_the_elbo(trained, digits):
    x = digits[1][:300]
    torch.manual_seed(1)
    with torch.no_grad():
        elbo = elbo_terms(trained(x), x, trained.head).elbo.mean().item()
        bounds = [iwae_log_likelihood(trained, x, k).mean().item() for k in (1, 3, 30)]
    assert bounds[0] == pytest.approx(elbo, abs=1.0)  # k = 1 is a one-sample estimate of the ELBO
    assert bounds == sorted(bounds) and bounds[-1] - bounds[0] > 0.2
    assert all(b > elbo for b in bounds[1:])


def test_iwae_is_chunked_so_memory_stays_bounded(trained, digits):
    x = digits[1][:37]
    rows = []

    def record(module, args, kwargs, out):
        rows.append(len(out.params))

    handle = trained.register_forward_hook(record, with_kwargs=True)
    try:
        torch.manual_seed(2)
        chunked = iwae_log_likelihood(trained, x, k=200, max_rows=64)
    finally:
        handle.remove()
    assert max(rows) <= 64 and sum(rows) == 37 * 200
    torch.manual_seed(3)
    whole = iwae_log_likelihood(trained, x, k=200, max_rows=1_000_000)
    assert chunked.shape == (37,)
    assert abs(chunked.mean() - whole.mean()) < 0.2  # same estimator, independent draws


def test_evaluate_reports_the_fixed_metrics_active_units_and_kl_parts(trained, digits):
    images, x = digits
    # The mu layer of dims 2 and 3 is zeroed: their posterior mean is constant over the data, so inactive.
    with torch.no_grad():
        trained.mu.weight[2:].zero_()
    torch.manual_seed(4)
    result = evaluate(trained, images[:512].split(100), k=20, prepare=lambda b: torch.bernoulli(b.float() / 255))
    m = result.metrics
    assert set(m) == {"val/elbo", "val/recon", "val/kl", "val/recon_mse", "val/nll_iwae", "val/bpd",
                      "val/active_units"}
    assert result.active[2:] == [False, False] and m["val/active_units"] == sum(result.active)
    assert m["val/nll_iwae"] < -m["val/elbo"]  # the IWAE NLL is the tighter bound
    assert m["val/bpd"] == pytest.approx(bits_per_dim(m["val/nll_iwae"], 64, discrete=True))
    assert sum(result.kl_per_dim) == pytest.approx(m["val/kl"], rel=1e-4)
    assert result.kl_per_group == pytest.approx([m["val/kl"]], rel=1e-4)


def test_evaluate_reports_kl_per_group_of_a_hierarchy():
    torch.manual_seed(0)
    model = build_model("hvae", (3, 8, 8), 2, width=8, groups=3, likelihood="logistic_mixture", mixtures=2)
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    result = evaluate(model, [images], k=4)
    assert len(result.kl_per_group) == 3 and len(result.kl_per_dim) == model.latent_size == 3 * 2 * 2 * 2
    assert sum(result.kl_per_group) == pytest.approx(result.metrics["val/kl"], rel=1e-4)
    assert 0 < result.metrics["val/bpd"] < 20


def test_mig_is_high_for_axis_aligned_factors_and_low_otherwise():
    rng = np.random.default_rng(0)
    factors = rng.integers(0, 5, size=(5000, 2))
    noise = rng.normal(size=(5000, 3))
    aligned = np.column_stack([factors[:, 0] + 0.1 * noise[:, 0], factors[:, 1] + 0.1 * noise[:, 1], noise[:, 2]])
    assert mutual_information_gap(aligned, factors) > 0.8
    # Each factor spread over two latents equally: the top two latents tie, the gap closes.
    mixed = np.column_stack([factors.sum(1) + 0.1 * noise[:, 0], factors[:, 0] - factors[:, 1] + 0.1 * noise[:, 1]])
    assert mutual_information_gap(mixed, factors) < 0.2
    assert mutual_information_gap(noise, factors) < 0.05
    with pytest.raises(ValueError, match="at least two latent dimensions"):
        mutual_information_gap(noise[:, :1], factors)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_pictures_are_drawn_for_every_architecture(arch, tmp_path):
    torch.manual_seed(0)
    model = build_model(arch, (1, 8, 8), 3, **({"width": 8} if arch in ("hvae", "resnet") else {})).eval()
    x = torch.rand(8, 1, 8, 8)
    files = [
        plots.temperatures(model, tmp_path / "temperatures.png"),
        plots.traversals(model, x[:1], [0, 1, 2], tmp_path / "traversals.png"),
        plots.interpolations(model, x, tmp_path / "interpolations.png"),
        plots.samples(model, model.latent_size, tmp_path / "samples.png"),
    ]
    assert all(f.is_file() and f.stat().st_size > 100 for f in files)
