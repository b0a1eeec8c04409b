"""LAMB and Muon: the layer-wise trust ratio, the orthogonalised step against torch's own Muon and AdamW, edge
cases, and states that resume exactly."""

import pytest
import torch
from torch import nn

from vae.training.optim import Lamb, MuonAdamW


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


def _steps(optimizers, params_sets, shapes, steps=4):
    """The same random gradients fed to each optimiser's parameters for `steps` steps."""
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for params in params_sets:
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone().view_as(p)
        for opt in optimizers:
            opt.step()


def test_muon_steps_matrices_as_torch_muon_and_the_rest_as_torch_adamw():
    torch.manual_seed(0)
    shapes = [(40, 30), (30,), (12, 50)]  # wide and tall matrices, a bias
    ours = _params(*(torch.randn(s) for s in shapes))
    ref = _params(*(p.detach() for p in ours))
    before = [p.detach().clone() for p in ours]
    opt = MuonAdamW(ours, lr=0.02, weight_decay=0.1)
    ref_opts = [torch.optim.Muon([ref[0], ref[2]], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"),
                torch.optim.AdamW([ref[1]], lr=0.02, weight_decay=0.1)]
    _steps([opt, *ref_opts], [ours, ref], shapes)
    for a, b, start in zip(ours, ref, before, strict=True):
        assert not torch.equal(a.detach(), start)  # it moved
        assert torch.equal(a, b)


def test_muon_treats_a_conv_filter_as_its_out_by_in_times_kernel_matrix():
    torch.manual_seed(0)
    (conv,) = _params(torch.randn(8, 3, 5, 5))
    (flat,) = _params(conv.detach().reshape(8, 75))
    before = conv.detach().clone()
    opt, ref = MuonAdamW([conv], lr=0.01), torch.optim.Muon([flat], lr=0.01, adjust_lr_fn="match_rms_adamw",
                                                            weight_decay=0.0)
    _steps([opt, ref], [[conv], [flat]], [(8, 75)])
    assert not torch.equal(conv.detach(), before)
    assert torch.equal(conv.detach().reshape(8, 75), flat.detach())


def test_muon_update_is_orthogonal_so_every_direction_moves_alike():
    # a gradient dominated by one direction: its step would be nearly rank 1; Muon's moves every direction
    torch.manual_seed(0)
    (w,) = _params(torch.zeros(32, 16))
    opt = MuonAdamW([w], lr=1.0)
    w.grad = 10 * torch.randn(32, 1) @ torch.randn(1, 16) + torch.randn(32, 16)
    grad_singular = torch.linalg.svdvals(w.grad)
    assert float(grad_singular.max() / grad_singular.min()) > 20
    opt.step()
    singular = torch.linalg.svdvals(w.detach())
    # Newton-Schulz gives singular values near 1 (0.5 to 1.5 by design), times the rate 0.2 * sqrt(32)
    assert float(singular.max() / singular.min()) < 3.5
    assert float(singular.median()) == pytest.approx(0.2 * 32**0.5, rel=0.5)


def test_muon_state_dict_resumes_bit_for_bit():
    torch.manual_seed(0)
    shapes = [(16, 8), (16,), (1, 16), (1,)]
    whole = _params(*(torch.randn(s) for s in shapes))
    cut = _params(*(p.detach() for p in whole))
    opt_whole, opt_cut = MuonAdamW(whole, lr=0.01), MuonAdamW(cut, lr=0.01)
    _steps([opt_whole], [whole], shapes, steps=6)
    _steps([opt_cut], [cut], shapes, steps=3)
    saved = opt_cut.state_dict()
    resumed = _params(*(p.detach() for p in cut))
    opt_resumed = MuonAdamW(resumed, lr=0.01)
    opt_resumed.load_state_dict(saved)
    gen_skip = torch.Generator().manual_seed(3)  # the gradients of steps 4 to 6 are the generator's 4th to 6th
    for _ in range(3):
        for s in shapes:
            torch.randn(s, generator=gen_skip)
    for _ in range(3):
        for p, s in zip(resumed, shapes, strict=True):
            p.grad = torch.randn(s, generator=gen_skip)
        opt_resumed.step()
    for a, b in zip(whole, resumed, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs", [{"lr": 0.0}, {"betas": (1.0, 0.999)}, {"eps": 0.0}, {"weight_decay": -1.0}])
def test_muon_refuses_invalid_settings(kwargs):
    with pytest.raises(ValueError, match="invalid Muon settings"):
        MuonAdamW([nn.Parameter(torch.ones(2, 2))], **kwargs)


def test_muon_refuses_param_groups_it_would_regroup():
    with pytest.raises(ValueError, match="groups the parameters itself"):
        MuonAdamW([{"params": [nn.Parameter(torch.ones(2, 2))]}])


@pytest.mark.parametrize("optimizer", [Lamb, MuonAdamW])
def test_step_returns_the_closures_loss_computed_with_gradients(optimizer):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = optimizer(model.parameters(), lr=1e-2)

    def closure():
        opt.zero_grad()
        loss = model(torch.ones(4, 3)).pow(2).mean()
        loss.backward()  # fails unless step turned gradients back on for the closure
        return loss

    first, second = float(opt.step(closure).detach()), float(opt.step(closure).detach())
    assert second < first
    assert opt.step() is None


def _adam_run(name, **kernels):
    """Twelve steps of torch's Adam/AdamW on a small conv net with the given kernel options; the weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    opt = cls(model.parameters(), lr=1e-2, weight_decay=0.1, **kernels)
    for step in range(12):
        x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(step))
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_step_kernels_give_the_per_tensor_result_on_a_cpu(name):
    from vae.training.optim import step_kernels

    assert step_kernels(name, "cpu") == {"foreach": True} and step_kernels(name, "cuda:0") == {"fused": True}
    loop = _adam_run(name, foreach=False)
    assert not torch.equal(loop[0], _adam_run("adam" if name == "adamw" else "adamw", foreach=False)[0])
    for a, b in zip(loop, _adam_run(name, **step_kernels(name, "cpu")), strict=True):
        assert torch.equal(a, b)  # foreach: the CPU path unchanged, to the bit
    for a, b in zip(loop, _adam_run(name, fused=True), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # fused (CUDA's choice; its CPU kernel here)


@pytest.mark.parametrize("name", ["lamb", "muon", "sgd"])
def test_step_kernels_leave_other_optimisers_alone(name):
    from vae.training.optim import step_kernels

    assert step_kernels(name, "cuda") == {} and step_kernels(name, "cpu") == {}
