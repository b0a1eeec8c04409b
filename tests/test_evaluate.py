"""Evaluation: the IWAE bound, chunking, active units, bits/dim, MIG, and the pictures."""

import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from vae.config import LossSection
from vae.models import MODELS, build_model
from vae.objectives.elbo import plots
from vae.objectives.elbo.evaluation import (
    evaluate,
    evaluation_totals,
    iwae_log_likelihood,
    mutual_information_gap,
    rows_within,
    summarize,
)
from vae.objectives.elbo.likelihoods import bits_per_dim
from vae.objectives.elbo.losses import elbo_terms, training_loss


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
    small = {"hvae": {"width": 8}, "resnet": {"width": 8},
             "aekl": {"channels": (4, 4, 4), "norm_groups": 2, "layers_per_block": 1}}.get(arch, {})
    model = build_model(arch, (1, 8, 8), 3, **small).eval()
    x = torch.rand(8, 1, 8, 8)
    files = [
        plots.temperatures(model, tmp_path / "temperatures.png"),
        plots.traversals(model, x[:1], [0, 1, 2], tmp_path / "traversals.png"),
        plots.interpolations(model, x, tmp_path / "interpolations.png"),
        plots.samples(model, model.latent_size, tmp_path / "samples.png"),
    ]
    assert all(f.is_file() and f.stat().st_size > 100 for f in files)


def test_iwae_chunked_over_k_equals_unchunked(trained, digits):
    """The running logsumexp over chunks of samples gives the one-logsumexp result. One image, so the chunks draw
    the same normals as the whole (torch's CPU generator fills whole blocks of 16 from one stream: 20 x 4)."""
    x = digits[1][:1]
    torch.manual_seed(5)
    whole = iwae_log_likelihood(trained, x, k=100, max_rows=1_000_000)
    torch.manual_seed(5)
    chunked = iwae_log_likelihood(trained, x, k=100, max_rows=20)
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-9)


def forward_rows(model):
    rows = []
    handle = model.register_forward_hook(lambda m, args, kwargs, out: rows.append(len(out.params)), with_kwargs=True)
    return rows, handle


def test_evaluation_within_a_memory_budget_gives_the_same_figures(trained, digits):
    """Peak RAM was 7.7 GB for 40 images at 112x92: images and samples now go in chunks of at most max_rows
    rows. The deterministic figures are equal; the sampled ones agree within Monte Carlo noise."""
    images = digits[0][:300]
    prepare = lambda b: b.float() / 255  # noqa: E731 (deterministic input: only the importance samples vary)
    torch.manual_seed(6)
    whole = evaluate(trained, images.split(150), k=40, prepare=prepare, max_rows=1_000_000)
    rows, handle = forward_rows(trained)
    try:
        torch.manual_seed(6)
        bounded = evaluate(trained, images.split(150), k=40, prepare=prepare, max_rows=32)
    finally:
        handle.remove()
    assert max(rows) <= 32
    for name in ("val/kl", "val/recon_mse", "val/active_units"):
        assert bounded.metrics[name] == pytest.approx(whole.metrics[name], rel=1e-9)
    assert bounded.kl_per_dim == pytest.approx(whole.kl_per_dim, rel=1e-9) and bounded.active == whole.active
    for name in ("val/elbo", "val/nll_iwae"):
        assert bounded.metrics[name] == pytest.approx(whole.metrics[name], abs=0.3)
    assert bounded.nonfinite == {}


def test_memory_budget_turns_into_rows():
    model = build_model("conv", (1, 112, 92), 16)
    per_row = 112 * 92 * (1024 + 32 * model.head.channels)
    assert rows_within(model, 1 << 30) == (1 << 30) // per_row
    assert rows_within(model, 1) == 1  # never zero: one row at a time is slow but bounded


def test_two_ranks_sum_to_what_one_rank_sees(trained, digits):
    """The split/gather logic of the final evaluation: each rank's exact slice (as the validation loader with
    pad=False gives it) summed like accelerate's reduce equals one rank over everything."""
    images = digits[0][:301]
    prepare = lambda b: b.float() / 255  # noqa: E731
    torch.manual_seed(7)
    one = summarize(evaluation_totals(trained, images.split(64), k=30, prepare=prepare), trained)
    n, world = len(images), 2
    slices = [images[r * n // world : (r + 1) * n // world] for r in range(world)]
    torch.manual_seed(7)
    two = summarize(sum(evaluation_totals(trained, s.split(64), k=30, prepare=prepare) for s in slices), trained)
    for name in ("val/kl", "val/recon_mse", "val/active_units"):
        assert two.metrics[name] == pytest.approx(one.metrics[name], rel=1e-9)
    assert two.kl_per_dim == pytest.approx(one.kl_per_dim, rel=1e-9)
    for name in ("val/elbo", "val/nll_iwae"):
        assert two.metrics[name] == pytest.approx(one.metrics[name], abs=0.3)
    # A rank with nothing to evaluate (more ranks than images) still sends a vector of the right length.
    empty = evaluation_totals(trained, [], k=30)
    assert empty.shape == one_totals_shape(trained) and not empty.any()


def one_totals_shape(model):
    return evaluation_totals(model, [torch.zeros(1, *model.image_shape, dtype=torch.uint8)], k=2).shape


def test_a_nan_metric_is_reported_with_its_reason_not_raised(trained, digits):
    with torch.no_grad():
        saved = trained.logvar.bias.clone()
        trained.logvar.bias.fill_(float("nan"))
    try:
        result = evaluate(trained, digits[0][:20].split(10), k=4)
    finally:
        with torch.no_grad():
            trained.logvar.bias.copy_(saved)
    assert math.isnan(result.metrics["val/nll_iwae"])
    assert "val/nll_iwae is nan: the IWAE estimate of log p(x) was not finite for 20 of 20 images" in \
        result.nonfinite["val/nll_iwae"]
