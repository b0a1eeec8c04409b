"""Non-finite optimiser steps skipped on the device, their count read one step late: no host sync per step.

The synchronous guard (`StepGuard`, below) reads whether the gradient norm is finite before it steps. That
read is a CPU-GPU sync per optimiser step: it drains the device's queue, so the next step's launches are exposed
(the product loop ran at 0.82 of the bare loop on an H100 at batch 16,384, bench/LOG.md). Here nothing waits:

- the step is skipped on the device (`masked_step`): torch's fused Adam, AdamW and SGD take a `found_inf` tensor
  (the mechanism `torch.amp.GradScaler` uses) and skip the whole update, step count included, inside the kernel;
  any other optimiser (foreach Adam, LAMB, Muon) steps and is then put back where the flag is set, by
  `torch.where` over a copy of its parameters and state (`masked`);
- the flags (non-finite, preemption), all-reduced on the device when there are several ranks, are copied to
  host memory without blocking (`DeviceStepGuard.advance`) and read at the next step, once that step's work is
  queued: the host then waits for a step the device has finished, while the device runs the next one.

Semantics are StepGuard's: a step whose gradients are not finite changes nothing (weights, optimiser state, EMA);
skipped steps are counted, and `limit` in a row stop the run with the same error naming the same step. Only the
moment the host learns of it moves: the error is raised, and a preemption acted on, one step later (that extra
step is itself skipped if its gradients are not finite, and is checkpointed like any other).

The trainer (vae/training/trainer.py) uses `DeviceStepGuard(StepGuard(limit))` where a step needs no host sync
(`train.deferred_step_check`, on by default on a CUDA device without fp16's scaler): `Trainer.step_on_device`
steps with `masked_step` / `masked` and calls `advance`; `Trainer.check` calls `flush` before each log and
checkpoint, so the counts saved and reported include the last step. The default optimiser on a GPU is fused AdamW
(vae.training.optim.step_kernels), which skips in the kernel with no copy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from vae.training.errors import TrainingError

# torch's optimisers whose fused kernels honour `found_inf` (torch.optim.adam._fused_adam and friends).
FOUND_INF_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


def nonfinite_flags(grad_norm: torch.Tensor, preempted: bool) -> torch.Tensor:
    """(2,) float32 on grad_norm's device: [gradients not finite, preemption requested]; sum it over ranks with
    an all-reduce (on the device: no host sync) and `> 0` says whether any rank saw either."""
    device = grad_norm.device
    # from pinned memory the host-to-device copy is asynchronous; from pageable memory CUDA syncs the stream first
    preempt = torch.full((1,), float(preempted), pin_memory=device.type == "cuda")
    return torch.cat([(~torch.isfinite(grad_norm)).float().reshape(1), preempt.to(device, non_blocking=True)])


def takes_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` (or the one an Accelerate wrapper holds) skips its step on device by `found_inf`."""
    inner = getattr(optimizer, "optimizer", optimizer)
    # the groups, not the defaults: loading a state saved without `fused` sets it back to None in each group
    return isinstance(inner, FOUND_INF_OPTIMIZERS) and all(g.get("fused") for g in inner.param_groups)


def masked(bad: torch.Tensor, update: Callable[[], object], tensors: Callable[[], Iterable[torch.Tensor]]) -> None:
    """Run `update`, then put back every tensor of `tensors()` as it was before where `bad` (a 0-d device tensor)
    is nonzero, with no host sync. A tensor that `update` created (optimiser state on a first step) goes back to
    zeros, which is how torch's optimisers and ours initialise their state. Hand-written because torch offers the
    on-device skip only inside its fused kernels. Costs one copy of the tensors per call: for a tensor that lives
    on the host (torch's non-capturable step counters) the flag's copy to the host is a sync."""
    before = {id(t): t.detach().clone() for t in tensors()}
    update()
    for t in tensors():
        flag = bad.to(t.device) != 0  # a no-op on the same device; to the host, a sync (see above)
        old = before.get(id(t))
        t.detach().copy_(torch.where(flag, old if old is not None else torch.zeros_like(t), t))


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters and every tensor of the state of `optimizer` (unwrapped from Accelerate's wrapper)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    params = [p for group in inner.param_groups for p in group["params"]]
    return [*params, *(v for p in params for v in inner.state.get(p, {}).values() if isinstance(v, torch.Tensor))]


def masked_step(optimizer: torch.optim.Optimizer, bad: torch.Tensor) -> None:
    """`optimizer.step()`, changing nothing where `bad` (0-d, on the device) is nonzero: in the fused kernel when
    the optimiser takes `found_inf`, otherwise through `masked`."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if takes_found_inf(optimizer):
        inner.found_inf = bad.float().reshape(())  # read by Adam.step/SGD.step as GradScaler sets it
        try:
            optimizer.step()
        finally:
            del inner.found_inf
        return
    masked(bad, optimizer.step, lambda: optimizer_tensors(optimizer))


class DeviceStepGuard:
    """Feeds a synchronous guard (`StepGuard` below: `record(skipped, step)`, `state_dict`) from device
    flags, read one step late, so that the counting, the limit and the error stay exactly StepGuard's.

    Per optimiser step: `stop = guard.advance(flags, step)` after the step's work is queued; it starts the copy
    of this step's flags and returns whether the previous step asked to stop, after recording whether that one
    was skipped (StepGuard raises there after `limit` in a row). `flush()` reads the last step's flags: call it
    before a checkpoint, before logging the skipped count, and at the end of an epoch.
    """

    def __init__(self, guard) -> None:
        self.guard = guard
        self._pending: tuple[torch.Tensor, torch.cuda.Event | None, int] | None = None

    def advance(self, flags: torch.Tensor, step: int) -> bool:
        """Start reading `flags` (nonfinite_flags, reduced over ranks) of optimiser step `step`; return whether
        the step before it asked to stop, after recording whether that one was skipped."""
        previous = self.flush()
        host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=flags.is_cuda)
        host.copy_(flags, non_blocking=True)
        event = None
        if flags.is_cuda:
            event = torch.cuda.Event()
            event.record()
        self._pending = (host, event, step)
        return previous

    def flush(self) -> bool:
        """Read the pending flags (waiting only for the step that wrote them); record them; return their stop
        flag (False when nothing is pending)."""
        if self._pending is None:
            return False
        host, event, step = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()  # that step's work only: the steps queued after it keep the device busy
        nonfinite, stop = (v > 0 for v in host.tolist())
        self.guard.record(nonfinite, step)
        return stop

    @property
    def total(self) -> int:
        """Skipped steps so far, as far as read (flush first for the last one)."""
        return self.guard.total

    def state_dict(self) -> dict[str, int]:
        """The synchronous guard's state; refused while a step is unread (flush first, or it would be lost)."""
        if self._pending is not None:
            raise RuntimeError("DeviceStepGuard.state_dict() with a step still unread: call flush() first")
        return self.guard.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._pending = None
        self.guard.load_state_dict(state)


class StepGuard:
    """Counts optimiser steps skipped for non-finite gradients; stops the run after `limit` in a row."""

    def __init__(self, limit: int) -> None:
        self.limit, self.in_a_row, self.total = limit, 0, 0

    def record(self, skipped: bool, step: int) -> None:
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        self.total += int(skipped)
        if self.in_a_row >= self.limit:
            raise TrainingError(
                f"{self.in_a_row} optimiser steps in a row had non-finite gradients (the last at step {step}); "
                "lower optim.lr, set optim.grad_clip, or train in bf16 rather than fp16"
            )

    def state_dict(self) -> dict[str, int]:
        return {"in_a_row": self.in_a_row, "total": self.total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.in_a_row, self.total = int(state["in_a_row"]), int(state["total"])
