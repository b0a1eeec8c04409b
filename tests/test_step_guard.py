"""The on-device skip of non-finite steps, read one step late, against the trainer's synchronous skip: the same
weights, optimiser state, EMA and counts over a sequence with NaN and inf steps, for every kind of optimiser."""

import copy
import math

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from vae.training.errors import TrainingError
from vae.training.optim import Lamb, MuonAdamW
from vae.training.step_guard import DeviceStepGuard, StepGuard, masked, masked_step, nonfinite_flags, takes_found_inf

OPTIMIZERS = {
    "adam-fused": lambda p: torch.optim.Adam(p, lr=1e-2, fused=True),  # the CUDA kernel's CPU twin: found_inf
    "adamw-fused": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True),
    "adam-foreach": lambda p: torch.optim.Adam(p, lr=1e-2, foreach=True),
    "adamw-loop": lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=False),
    "lamb": lambda p: Lamb(p, lr=1e-2),
    "muon": lambda p: MuonAdamW(list(p), lr=1e-2),
}
BAD = {0: math.nan, 3: math.inf, 4: math.nan, 7: math.nan}  # step -> what poisons one gradient; step 0: no state yet


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _gradients(model, step):
    """Real gradients of a fixed batch per step; one entry poisoned on the steps in BAD."""
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)
    nn.functional.mse_loss(model(x), y).backward()
    if step in BAD:
        model[2].weight.grad[1, 2] = BAD[step]
    return nn.utils.clip_grad_norm_(model.parameters(), math.inf)


def _synchronous(name, steps, limit=10, ema_decay=0.9):
    """The trainer's step today: the host reads the norm, then steps or not."""
    model = _model()
    opt, guard = OPTIMIZERS[name](model.parameters()), StepGuard(limit)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay))
    for step in range(steps):
        nonfinite = not bool(torch.isfinite(_gradients(model, step)))
        if not nonfinite:
            opt.step()
        guard.record(nonfinite, step)
        if not nonfinite:
            ema.update_parameters(model)
        opt.zero_grad(set_to_none=True)
    return model, opt, ema, guard


def _on_device(name, steps, limit=10, ema_decay=0.9, preempt_at=None):
    """The same loop with nothing read on the host until the next step: the call site the trainer will have."""
    model = _model()
    opt, guard = OPTIMIZERS[name](model.parameters()), DeviceStepGuard(StepGuard(limit))
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay))
    stops = []
    for step in range(steps):
        flags = nonfinite_flags(_gradients(model, step), preempted=step == preempt_at)
        masked_step(opt, flags[0])
        masked(flags[0], lambda: ema.update_parameters(model), lambda: [*ema.parameters(), *ema.buffers()])
        if guard.advance(flags, step):
            stops.append(step)
        opt.zero_grad(set_to_none=True)
    if guard.flush():
        stops.append(steps)
    return model, opt, ema, guard, stops


def _tensors(opt):
    return [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_on_device_skip_equals_the_synchronous_skip(name):
    ref_model, ref_opt, ref_ema, ref_guard = _synchronous(name, 10)
    model, opt, ema, guard, stops = _on_device(name, 10)
    assert ref_guard.state_dict() == guard.state_dict() == {"in_a_row": 0, "total": len(BAD)}
    for a, b in zip(ref_model.parameters(), model.parameters(), strict=True):
        assert torch.isfinite(b).all() and torch.equal(a, b)
    ref_state, state = _tensors(ref_opt), _tensors(opt)
    assert len(ref_state) == len(state) > 0
    for a, b in zip(ref_state, state, strict=True):
        assert torch.equal(a.cpu(), b.cpu())  # step counts too: a skipped step does not advance Adam's t
    for a, b in zip(ref_ema.state_dict().values(), ema.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert int(ema.n_averaged) == 10 - len(BAD) and stops == []


def test_a_poisoned_step_would_have_changed_the_weights_without_the_mask():
    """The equivalence above is not vacuous: an unmasked step with a NaN gradient ruins the weights."""
    model = _model()
    opt = OPTIMIZERS["adam-foreach"](model.parameters())
    _gradients(model, 0)
    opt.step()
    assert not torch.isfinite(model[2].weight).all()


def test_fused_optimisers_skip_in_the_kernel_and_the_others_by_copy():
    params = list(_model().parameters())
    assert takes_found_inf(OPTIMIZERS["adam-fused"](params)) and takes_found_inf(OPTIMIZERS["adamw-fused"](params))
    assert not any(takes_found_inf(OPTIMIZERS[n](params)) for n in ("adam-foreach", "lamb", "muon"))
    opt = OPTIMIZERS["adam-fused"](params)
    params[0].grad = torch.ones_like(params[0])
    masked_step(opt, torch.tensor(1.0))
    assert not hasattr(opt, "found_inf")  # not left behind for a later step
    assert float(opt.state[params[0]]["step"]) == 0


def test_the_error_is_the_synchronous_one_read_one_step_later():
    limit = 2  # steps 3 and 4 are the first two non-finite in a row
    with pytest.raises(TrainingError) as sync:
        _synchronous("adam-fused", 10, limit=limit)
    with pytest.raises(TrainingError) as late:
        _on_device("adam-fused", 10, limit=limit)
    assert str(late.value) == str(sync.value)
    assert "2 optimiser steps in a row" in str(sync.value) and "the last at step 4" in str(sync.value)


def test_a_preemption_stops_one_step_later_on_every_path():
    *_, stops = _on_device("adam-fused", 6, preempt_at=2)
    assert stops == [3]  # step 3 ran (its work was already queued), then the loop stops
    *_, stops = _on_device("adam-fused", 3, preempt_at=2)
    assert stops == [3]  # the last step's flag is read by flush(), after the loop


def test_state_dict_refuses_an_unread_step_and_resumes_the_counts():
    guard = DeviceStepGuard(StepGuard(5))
    guard.advance(torch.tensor([1.0, 0.0]), step=0)
    with pytest.raises(RuntimeError, match="call flush"):
        guard.state_dict()
    assert guard.flush() is False
    assert guard.state_dict() == {"in_a_row": 1, "total": 1}
    again = DeviceStepGuard(StepGuard(5))
    again.load_state_dict(guard.state_dict())
    again.advance(torch.tensor([1.0, 0.0]), step=1)
    again.flush()
    assert again.state_dict() == {"in_a_row": 2, "total": 2}


def test_masked_leaves_a_good_update_alone_and_undoes_a_bad_one():
    t = torch.arange(4.0)
    masked(torch.tensor(0.0), lambda: t.mul_(2), lambda: [t])
    assert t.tolist() == [0.0, 2.0, 4.0, 6.0]
    masked(torch.tensor(1.0), lambda: t.fill_(math.nan), lambda: [t])
    assert t.tolist() == [0.0, 2.0, 4.0, 6.0]
    state = {}
    masked(torch.tensor(1.0), lambda: state.setdefault("m", torch.full((2,), math.nan)), lambda: list(state.values()))
    assert state["m"].tolist() == [0.0, 0.0]  # created by the bad update: back to the zeros state starts from


def test_an_optimizer_inside_accelerates_wrapper_is_found():
    """Accelerate's wrapper holds the optimiser as `.optimizer`: the helpers unwrap it."""
    model = _model()

    class Wrapper:
        def __init__(self, optimizer):
            self.optimizer = optimizer

        def step(self):
            self.optimizer.step()

    inner = OPTIMIZERS["adam-fused"](model.parameters())
    before = copy.deepcopy(list(model.parameters()))
    _gradients(model, 0)
    masked_step(Wrapper(inner), torch.tensor(1.0))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert takes_found_inf(Wrapper(inner))


def test_a_fused_optimiser_that_loaded_an_unfused_state_takes_the_copy_path():
    """torch's load_state_dict replaces each group's `fused` with the saved one: the skip must follow the groups."""
    params = list(_model().parameters())
    saved = OPTIMIZERS["adam-foreach"](params).state_dict()
    opt = OPTIMIZERS["adam-fused"](params)
    opt.load_state_dict(saved)
    assert not takes_found_inf(opt)
    params[0].grad = torch.full_like(params[0], math.nan)
    before = params[0].detach().clone()
    masked_step(opt, torch.tensor(1.0))
    assert torch.equal(params[0], before)
