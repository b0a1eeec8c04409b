"""Likelihoods, objectives and unit conversions: the numbers papers compare, checked on known cases."""

import math

import pytest
import torch

from vae.config import LossSection
from vae.models import Gaussian, build_model
from vae.models.heads import LAYOUTS, Head
from vae.objectives.elbo.likelihoods import (
    LIKELIHOODS,
    bernoulli_log_prob,
    bits_per_dim,
    discretized_logistic_mixture_log_prob,
    gaussian_log_prob,
    log_likelihood,
)
from vae.objectives.elbo.losses import (
    free_bits_kl,
    gaussian_log_density,
    iwae_bound,
    kl_elements,
    kl_weight,
    log_weights,
    training_loss,
)


def test_every_likelihood_has_a_head_layout_and_back():
    assert set(LIKELIHOODS) == set(LAYOUTS)


@pytest.mark.parametrize(("mean", "log_scale"), [(0.0, -1.0), (0.9, -4.0), (-1.0, -7.5), (0.3, 1.5), (1.2, -3.0)])
def test_discretised_logistic_mixture_sums_to_one_over_256_values(mean, log_scale):
    torch.manual_seed(0)
    k = 3
    values = torch.arange(256, dtype=torch.float32).div(255).view(256, 1, 1, 1)  # one 1x1 image per level
    logits = torch.randn(1, k, 1, 1).expand(256, -1, -1, -1)
    means = (mean + 0.1 * torch.randn(1, k, 1, 1, 1)).expand(256, -1, -1, -1, -1)
    log_scales = (log_scale + 0.1 * torch.randn(1, k, 1, 1, 1)).expand(256, -1, -1, -1, -1)
    log_p = discretized_logistic_mixture_log_prob(logits, means, log_scales, values)
    assert torch.isfinite(log_p).all() and (log_p <= 1e-6).all()
    torch.testing.assert_close(log_p.double().exp().sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-4, rtol=0)


def test_discretised_logistic_rounds_dequantised_input_to_its_level():
    head = Head.build("logistic_mixture", 3, mixtures=2)
    params = torch.randn(2, head.channels, 4, 4)
    x = torch.randint(0, 256, (2, 3, 4, 4)).float() / 255
    noisy = x + (torch.rand_like(x) - 0.5) / 300  # less than half a level
    torch.testing.assert_close(log_likelihood(head, params, noisy), log_likelihood(head, params, x))


def test_bernoulli_is_stable_at_extreme_logits_and_matches_torch():
    logits = torch.tensor([[-200.0, -20.0, 0.0, 20.0, 200.0]]).view(1, 1, 1, 5)
    x = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0]]).view(1, 1, 1, 5)
    expected = torch.distributions.Bernoulli(logits=logits.double()).log_prob(x.double()).sum()
    got = bernoulli_log_prob(logits.half(), x)  # half input: computed in float32 all the same
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), expected.reshape(1), rtol=1e-5, atol=1e-4)


def test_gaussian_log_prob_matches_torch_and_heads_read_their_layout():
    torch.manual_seed(0)
    mean, log_std, x = torch.rand(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.rand(2, 3, 4, 4)
    expected = torch.distributions.Normal(mean, log_std.exp()).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_log_prob(mean, log_std, x), expected)
    learned = Head.build("gaussian_learned", 3)
    params = torch.cat([torch.logit(mean), log_std], 1)
    torch.testing.assert_close(log_likelihood(learned, params, x), expected, rtol=1e-4, atol=1e-3)
    fixed = Head.build("gaussian", 3, gaussian_std=0.2)
    expected = torch.distributions.Normal(mean, 0.2).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(log_likelihood(fixed, torch.logit(mean), x), expected, rtol=1e-4, atol=1e-3)


def test_bits_per_dim_on_known_cases():
    dims = 3 * 32 * 32
    # A uniform distribution over the 256 values of every pixel is 8 bits per dimension ...
    assert bits_per_dim(dims * math.log(256), dims, discrete=True) == pytest.approx(8.0)
    # ... and so is the uniform density on [0, 1]^D (log density 0) once moved to the 8-bit scale.
    assert bits_per_dim(0.0, dims, discrete=False) == pytest.approx(8.0)
    # Binary pixels, each a fair coin: one bit per dimension.
    assert bits_per_dim(784 * math.log(2), 784, discrete=True) == pytest.approx(1.0)
    # And the likelihood itself: a logistic centred on each pixel's level with a tiny scale puts nearly all its
    # mass there (97%: the scale is floored at e^-7, 1/4 of a level), ~0.04 bits per dimension, and scores far
    # worse on the neighbouring level.
    head = Head.build("logistic_mixture", 3, mixtures=1)
    x = torch.randint(1, 255, (1, 3, 32, 32)).float() / 255
    params = torch.cat([torch.zeros(1, 1, 32, 32), 2 * x - 1, torch.full_like(x, -7.0)], 1)
    assert float(bits_per_dim(-log_likelihood(head, params, x), dims, discrete=True)) == pytest.approx(0.039, abs=2e-3)
    assert float(bits_per_dim(-log_likelihood(head, params, x + 1 / 255), dims, discrete=True)) > 1


def test_kl_warm_up_is_a_ramp_to_beta():
    cfg = LossSection(beta=2.0, warmup_steps=100)
    assert [kl_weight(cfg, s) for s in (0, 50, 100, 1000)] == [0.0, 1.0, 2.0, 2.0]
    assert kl_weight(LossSection(beta=0.5), 0) == 0.5


@pytest.mark.parametrize("per", ["dim", "group"])
def test_free_bits_stop_the_gradient_below_the_floor(per):
    kls = [torch.tensor([[0.1, 2.0], [0.1, 2.0]], requires_grad=True), torch.tensor([[0.2], [0.4]], requires_grad=True)]
    penalty = free_bits_kl(kls, nats=0.5, per=per)
    penalty.backward()
    if per == "dim":  # dims' batch means 0.1, 2.0 | 0.3: floored to 0.5, 2.0, 0.5
        assert penalty.item() == pytest.approx(3.0)
        assert kls[0].grad[:, 0].abs().sum() == 0 and kls[0].grad[:, 1].abs().sum() > 0 and kls[1].grad.sum() == 0
    else:  # groups' batch means 2.1 and 0.3: floored to 2.1, 0.5
        assert penalty.item() == pytest.approx(2.6)
        assert kls[0].grad.abs().sum() > 0 and kls[1].grad.abs().sum() == 0


def test_iwae_bound_of_equal_weights_and_its_order():
    log_w = torch.tensor([[-3.0, -1.0], [-3.0, -5.0]]).reshape(-1)  # (k=2, B=2) sample-major
    torch.testing.assert_close(iwae_bound(log_w, 2), torch.tensor([-3.0, math.log((math.exp(-1) + math.exp(-5)) / 2)]))


class CountingModel(torch.nn.Module):
    """Counts forwards and the rows it was asked for, like a DDP wrapper around the real model."""

    def __init__(self, inner):
        super().__init__()
        self.module, self.calls = inner, []

    def forward(self, x, samples=1):
        self.calls.append(len(x) * samples)
        return self.module(x, samples=samples)


@pytest.mark.parametrize("arch", ["mlp", "hvae"])
def test_iwae_objective_is_one_forward_of_k_samples_and_bounds_the_elbo(arch):
    torch.manual_seed(0)
    model = CountingModel(build_model(arch, (1, 8, 8), 2, **({"width": 8} if arch == "hvae" else {})))
    x = torch.bernoulli(torch.rand(6, 1, 8, 8))
    terms = training_loss(model, x, LossSection(objective="iwae", iwae_k=16), step=0)
    assert model.calls == [6 * 16]  # a DDP-wrapped model is called once per step
    assert terms.elbo.shape == terms.recon.shape == terms.kl.shape == (6,)
    assert -terms.loss.item() > terms.elbo.mean().item()  # the IWAE-16 bound sits above the ELBO
    terms.loss.backward()
    elbo = training_loss(model, x, LossSection(), step=0)
    assert model.calls[-1] == 6 and torch.isfinite(elbo.loss)


@pytest.mark.parametrize("logvar", [-200.0, -143.0, -119.0, -90.0, -30.0, 0.0, 20.0, 50.0])
def test_latent_log_density_is_finite_and_exact_for_any_log_variance(logvar):
    """A collapsed posterior (log-variances of -143 to -119 on 105x105 glyphs) made exp(-logvar) overflow
    float32, and the final NLL came out NaN. Compared with torch's Normal in float64."""
    torch.manual_seed(0)
    mu = torch.randn(4, 6)
    lv = torch.full((4, 6), logvar) + torch.linspace(-0.5, 0.5, 6)
    std = torch.exp(0.5 * lv.double())
    z_exact = mu.double() + std * torch.randn(4, 6, dtype=torch.float64)
    for z in (z_exact.float(), mu, mu + 1.0):  # a sample as float32 holds it; exactly the mean; far from the mean
        got = gaussian_log_density(z, Gaussian(mu, lv))
        expected = torch.distributions.Normal(mu.double(), std).log_prob(z.double()).sum(1)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-9)
    kl = kl_elements(Gaussian(mu, lv), Gaussian(torch.zeros_like(mu), torch.zeros_like(mu)))
    normal = torch.distributions.Normal
    expected_kl = torch.distributions.kl_divergence(normal(mu.double(), std), normal(0.0, 1.0))
    assert torch.isfinite(kl).all()
    torch.testing.assert_close(kl.double(), expected_kl, rtol=1e-6, atol=1e-6)


def test_iwae_weights_of_a_collapsed_posterior_are_finite():
    """The failing run's case end to end: an encoder whose log-variances are -143 still gives finite IWAE weights."""
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 4, hidden_dim=16)
    with torch.no_grad():
        model.logvar.weight.zero_()
        model.logvar.bias.fill_(-143.0)
    x = torch.bernoulli(torch.rand(5, 1, 8, 8))
    out = model(x, samples=3)
    log_w = log_weights(out, x.repeat(3, 1, 1, 1), model.head)
    assert torch.isfinite(log_w).all()
