"""Float16 loss scaling: both wrappers with a torch.amp.GradScaler.

Scaling is linear, so in float64 (where nothing overflows) a scaled run must match an unscaled
one to rounding; under float16 autocast an overflow must skip the step without touching
anything but the scale, and the meta-gradients must stay close to float32.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metafair_opt import GradientAlignmentWrapper, SampleReweighter

N = 24


def make_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2)).to(dtype)


def make_data(dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 6, generator=g, dtype=dtype)
    y = torch.randint(0, 2, (N,), generator=g)
    groups = torch.arange(N) % 2
    return x, y, groups


def make_wrapper(kind: str, model: nn.Module, optimizer, scaler=None):
    if kind.startswith("alignment"):
        return GradientAlignmentWrapper(model, optimizer, F.cross_entropy, inner_lr=0.5,
                                        grad_scaler=scaler,
                                        recompute_support=kind.endswith("recompute"))
    return SampleReweighter(model, optimizer, num_samples=N, loss_fn=F.cross_entropy,
                            meta_loss="max_loss_discrepancy", weight_lr=0.1,
                            grad_scaler=scaler,
                            weight_grad_mode="reverse" if kind == "reweighter" else "forward",
                            recompute_forward=kind.endswith("recompute"))


def run_step(kind: str, wrapper, x, y, groups, idx=None):
    if kind.startswith("alignment"):
        return wrapper.step((x[:8], y[:8]), (x[8:], y[8:]))
    idx = torch.arange(N) if idx is None else idx
    return wrapper.step(x, y, idx, val=(x, y, groups))


@pytest.mark.parametrize("kind", ["alignment", "alignment-recompute", "reweighter",
                                  "reweighter-forward", "reweighter-recompute"])
def test_scaled_steps_equal_unscaled_steps_in_float64(kind: str) -> None:
    x, y, groups = make_data(torch.float64)
    finals = {}
    for scaled in (False, True):
        model = make_model(torch.float64)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1) \
            if scaled else None
        wrapper = make_wrapper(kind, model, optimizer, scaler)
        for _ in range(3):
            wrapper.zero_grad()
            assert not run_step(kind, wrapper, x, y, groups).skipped
        if scaled:  # grad_scaler.update() ran after each step: the scale grew every time
            assert scaler.get_scale() == 2.0**15
        finals[scaled] = ([p.detach().clone() for p in model.parameters()],
                          wrapper.weights.clone() if kind.startswith("reweighter") else None)
    for a, b in zip(finals[False][0], finals[True][0]):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)
    if kind.startswith("reweighter"):
        assert not torch.equal(finals[True][1], torch.zeros(N, dtype=finals[True][1].dtype))
        torch.testing.assert_close(finals[False][1], finals[True][1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["alignment", "alignment-recompute", "reweighter",
                                  "reweighter-forward", "reweighter-recompute"])
def test_float16_overflow_skips_the_step_and_backs_off_the_scale(kind: str) -> None:
    x, y, groups = make_data()
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    wrapper = make_wrapper(kind, model, optimizer, scaler)
    with torch.autocast("cpu", dtype=torch.float16):
        run_step(kind, wrapper, x, y, groups)  # momentum buffers exist from here on
    before_model = copy.deepcopy(model.state_dict())
    before_state = copy.deepcopy(wrapper.state_dict())
    scale = scaler.get_scale()
    assert scale == 2.0**39  # the first step overflowed as well

    wrapper.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16):
        result = run_step(kind, wrapper, x, y, groups)
    assert result.skipped
    assert scaler.get_scale() == scale * 0.5
    for key, value in model.state_dict().items():
        assert torch.equal(value, before_model[key]), key
    after_state = wrapper.state_dict()
    assert after_state["step_count"] == before_state["step_count"]
    assert after_state["optimizer"] == before_state["optimizer"]  # no momentum buffers yet
    if kind.startswith("reweighter"):
        assert torch.equal(after_state["weights"], before_state["weights"])
        assert torch.equal(after_state["seen"], before_state["seen"])
    assert all(p.grad is None for p in model.parameters())

    # The scale keeps backing off until a step fits in float16; then training proceeds.
    for _ in range(60):
        wrapper.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            result = run_step(kind, wrapper, x, y, groups)
        if not result.skipped:
            break
    assert not result.skipped
    assert scaler.get_scale() < 2.0**24
    assert any(not torch.equal(p, before_model[k]) for k, p in model.state_dict().items())
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("kind", ["alignment", "alignment-recompute", "reweighter",
                                  "reweighter-forward", "reweighter-recompute"])
def test_non_finite_input_under_a_scaler_raises_and_keeps_the_scale(kind: str) -> None:
    x, y, groups = make_data()
    x[3, 0] = float("nan")
    model = make_model()
    before = copy.deepcopy(model.state_dict())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    wrapper = make_wrapper(kind, model, torch.optim.SGD(model.parameters(), lr=0.1), scaler)
    first = ("support loss at inner step 1 of 1" if kind.startswith("alignment")
             else "training loss")
    with pytest.raises(FloatingPointError, match=f"The {first} is"):
        run_step(kind, wrapper, x, y, groups)
    assert scaler.get_scale() == 2.0**10
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("kind", ["alignment", "alignment-recompute", "reweighter",
                                  "reweighter-forward", "reweighter-recompute"])
def test_float16_meta_gradients_stay_close_to_float32(kind: str) -> None:
    """Measured: relative error about 1e-3 (float16 keeps 11 bits of mantissa)."""
    x, y, groups = make_data()

    def applied_gradient(amp: bool) -> torch.Tensor:
        model = make_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # p.grad is left as applied
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if amp else None
        wrapper = make_wrapper(kind, model, optimizer, scaler)
        if kind.startswith("reweighter"):  # uneven weights, so the meta-gradient shapes the update
            wrapper.load_state_dict({**wrapper.state_dict(),
                                     "weights": torch.linspace(-1.0, 1.0, N)})
        with torch.autocast("cpu", dtype=torch.float16, enabled=amp):
            assert not run_step(kind, wrapper, x, y, groups).skipped
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    exact, half = applied_gradient(False), applied_gradient(True)
    assert ((half - exact).norm() / exact.norm()).item() < 0.01


def test_grad_scaler_must_be_a_grad_scaler() -> None:
    model = make_model()
    with pytest.raises(TypeError, match=r"grad_scaler must be a torch\.amp\.GradScaler; got float"):
        GradientAlignmentWrapper(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                 F.cross_entropy, grad_scaler=1024.0)


def test_an_overflow_restarts_the_growth_count_as_gradscaler_does() -> None:
    """good step, overflow, good step with growth_interval=2: GradScaler's own rule keeps the
    backed-off scale (the growth count restarts at the overflow)."""
    x, y, _ = make_data()
    model = make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=2)
    wrapper = make_wrapper("alignment", model, torch.optim.SGD(model.parameters(), lr=0.01),
                           scaler)
    scales = []
    for inputs in (x, x * 1000.0, x):  # the large inputs overflow float16 in the backward only
        wrapper.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            result = run_step("alignment", wrapper, inputs, y, None)
        scales.append((result.skipped, scaler.get_scale()))
    assert scales == [(False, 2.0**16), (True, 2.0**15), (False, 2.0**15)]

