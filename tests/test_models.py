"""Architectures, the objective, and the architecture rule that models know nothing of training."""

import ast
from pathlib import Path

import pytest
import torch

from vae.losses import bernoulli_nll, elbo_terms, gaussian_kl
from vae.models import MODELS, build_model

MODEL_FILES = sorted((Path(__file__).resolve().parents[1] / "vae" / "models").glob("*.py"))


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32), (1, 30, 26), (3, 64, 64)])
def test_shapes_round_trip(arch, shape):
    model = build_model(arch, shape, latent_dim=3)
    x = torch.rand(2, *shape)
    out = model(x)
    assert out.logits.shape == x.shape
    assert out.mu.shape == out.logvar.shape == out.z.shape == (2, 3)
    decoded = model.decode(out.mu)
    assert decoded.shape == x.shape and decoded.min() >= 0 and decoded.max() <= 1


def test_unknown_architecture_lists_valid():
    with pytest.raises(ValueError, match="unknown model architecture 'vit'; valid: conv, mlp"):
        build_model("vit", (1, 8, 8), 2)


@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda p: p.name)
def test_model_files_import_no_training_code(path):
    forbidden = {"accelerate", "mlflow", "prefect", "pipeline", "flows"}
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        for name in names:
            assert name.split(".")[0] not in forbidden, f"{path.name} imports {name}"


def test_analytic_kl_matches_monte_carlo():
    torch.manual_seed(0)
    mu, logvar = torch.randn(4, 3), torch.randn(4, 3) * 0.5
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    z = q.sample((200_000,))
    p = torch.distributions.Normal(0.0, 1.0)
    mc = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean(0)
    torch.testing.assert_close(gaussian_kl(mu, logvar), mc, atol=0.02, rtol=0.01)


def test_bernoulli_nll_is_binary_cross_entropy_summed_over_pixels():
    logits, x = torch.randn(2, 1, 4, 4), torch.rand(2, 1, 4, 4)
    p = torch.sigmoid(logits)
    expected = -(x * p.log() + (1 - x) * (1 - p).log()).flatten(1).sum(1)
    torch.testing.assert_close(bernoulli_nll(logits, x), expected)


def test_elbo_is_minus_recon_minus_kl_and_gradients_flow():
    model = build_model("conv", (1, 8, 8), 2)
    x = torch.rand(5, 1, 8, 8)
    terms = elbo_terms(model(x), x, beta=2.0)
    torch.testing.assert_close(terms.elbo, -(terms.recon + terms.kl))
    torch.testing.assert_close(terms.loss, (terms.recon + 2.0 * terms.kl).mean())
    terms.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
