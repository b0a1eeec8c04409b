"""LAMB: the layer-wise trust ratio, its edge cases, and a state that resumes exactly."""

import pytest
import torch
from torch import nn

from vae.optim import Lamb


def _params(*tensors):
    return [nn.Parameter(t.clone()) for t in tensors]


def test_each_tensor_moves_by_lr_times_its_own_norm():
    torch.manual_seed(0)
    big, small = _params(torch.randn(64, 32) * 3, torch.randn(16, 4) * 0.01)
    opt = Lamb([big, small], lr=0.01)
    before = [big.detach().clone(), small.detach().clone()]
    big.grad, small.grad = torch.randn_like(big), torch.randn_like(small) * 1e-4  # gradient scales unrelated
    opt.step()
    for p, w in zip((big, small), before, strict=True):
        assert float((p.detach() - w).norm()) == pytest.approx(0.01 * float(w.norm()), rel=1e-4)


def test_weight_decay_joins_the_update_before_the_trust_ratio():
    (w,) = _params(torch.ones(2, 2))
    opt = Lamb([w], lr=0.1, weight_decay=1.0)
    w.grad = torch.zeros(2, 2)  # the update is the decay term alone: w itself, so the step is -lr * w
    opt.step()
    assert torch.allclose(w.detach(), torch.full((2, 2), 0.9))


@pytest.mark.parametrize("start", [torch.zeros(1, 3), torch.tensor([1e-3, 5.0, -2.0])], ids=["zero", "1-d"])
def test_zero_and_1d_tensors_take_the_plain_adam_step(start):
    (p,) = _params(start)
    opt = Lamb([p], lr=0.1, eps=1e-8)
    p.grad = torch.tensor([2.0, -3.0, 0.5]).reshape(start.shape)
    opt.step()
    # Adam's first bias-corrected step is lr * g / |g| = lr * sign(g), whatever the tensor's norm
    assert torch.allclose(p.detach() - start, torch.tensor([-0.1, 0.1, -0.1]).reshape(start.shape), atol=1e-6)


def test_trust_ratio_is_capped():
    (w,) = _params(torch.full((2, 2), 1000.0))
    opt = Lamb([w], lr=0.01, max_trust=2.0)
    w.grad = torch.ones(2, 2)
    opt.step()
    # the Adam update has norm 2 (four ones); uncapped the ratio would be 1000, capped it is 2: step 0.01*2*1
    assert torch.allclose(w.detach(), torch.full((2, 2), 1000.0 - 0.02))


def test_it_fits_a_regression():
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = x @ torch.randn(8, 1) + 0.5
    model = nn.Linear(8, 1)
    opt = Lamb(model.parameters(), lr=0.05)
    # every step moves a layer by lr x its norm, so without decay it would circle the optimum at that radius
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / 300)
    first = None
    for _ in range(300):
        loss = nn.functional.mse_loss(model(x), y)
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
    assert float(loss.detach()) < 1e-3 * first


def test_state_dict_resumes_bit_for_bit():
    torch.manual_seed(0)
    data = [torch.randn(32, 8) for _ in range(10)]

    def train(model, opt, batches):
        for x in batches:
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()

    torch.manual_seed(1)
    whole = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    cut = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    cut.load_state_dict(whole.state_dict())
    opt_whole = Lamb(whole.parameters(), lr=0.01, weight_decay=0.01)
    train(whole, opt_whole, data)

    opt_cut = Lamb(cut.parameters(), lr=0.01, weight_decay=0.01)
    train(cut, opt_cut, data[:4])
    saved = {"model": cut.state_dict(), "opt": opt_cut.state_dict()}
    torch.manual_seed(2)
    resumed = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    resumed.load_state_dict(saved["model"])
    opt_resumed = Lamb(resumed.parameters(), lr=0.01, weight_decay=0.01)
    opt_resumed.load_state_dict(saved["opt"])
    train(resumed, opt_resumed, data[4:])
    for a, b in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs", [{"lr": 0.0}, {"betas": (1.0, 0.999)}, {"eps": 0.0}, {"weight_decay": -1.0}])
def test_invalid_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="invalid LAMB settings"):
        Lamb([nn.Parameter(torch.ones(1))], **kwargs)
