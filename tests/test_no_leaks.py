"""No growth: after 200 steps the same tensors, and the same bytes of them, are live as after
10 (no timing)."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
from torch import nn

from metafair_opt.benchmark import live_bytes_growth, make_step, make_workload


def live_tensor_count() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on some lazy torch objects warns
        warnings.simplefilter("ignore")
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def assert_no_growth(step) -> None:
    """The live tensors after 200 calls of ``step`` are those after 10: as many Python
    tensor objects, and as many bytes of tensors (which also counts what autograd graphs hold
    and tensors that grow in place)."""
    counts = []

    def counted_step() -> None:
        step()
        calls = len(counts) + 1
        counts.append(live_tensor_count() if calls in (10, 200) else None)

    assert live_bytes_growth(counted_step, first=10, last=200) == 0
    assert counts[9] == counts[199]


def test_the_growth_measurement_sees_a_graph_chained_across_steps() -> None:
    torch.manual_seed(0)
    layer, x = nn.Linear(50, 50), torch.randn(8, 50)
    total = [torch.zeros(())]

    def step() -> None:  # one Python tensor all along; its graph keeps every step's input
        total[0] = total[0] + torch.tanh(layer(x)).sum()

    assert live_bytes_growth(step, first=10, last=20) >= 10 * 8 * 50 * 4


def test_the_growth_measurement_sees_a_tensor_growing() -> None:
    held = [torch.zeros(0)]

    def step() -> None:  # one Python tensor all along, 4 KB longer each step
        held[0] = torch.cat([held[0], torch.zeros(1000)])

    assert live_bytes_growth(step, first=10, last=20) == 10 * 4000


def test_the_growth_measurement_of_a_step_that_keeps_nothing() -> None:
    x = torch.randn(100, 100)

    def step() -> None:
        (x @ x).relu().sum()

    assert live_bytes_growth(step, first=3, last=30) == 0
    with pytest.raises(ValueError, match="needs 0 < first < last; got 5, 5"):
        live_bytes_growth(step, first=5, last=5)


@pytest.mark.parametrize("variant", ["alignment", "alignment_first_order", "alignment_5_inner",
                                     "reweighter", "reweighter_every_5", "alignment_compiled",
                                     "alignment_first_order_compiled", "reweighter_compiled",
                                     "alignment_recompute", "reweighter_recompute"])
def test_no_tensor_growth_over_many_steps(variant: str) -> None:
    step, _ = make_step(variant, make_workload("mlp"))
    assert_no_growth(step)


@pytest.mark.parametrize("recompute", [False, True])
def test_no_tensor_growth_with_the_forward_mode_weight_gradient(recompute: bool) -> None:
    from metafair_opt import SampleReweighter

    w = make_workload("mlp")
    model = w.model(torch.device("cpu"))
    rw = SampleReweighter(model, torch.optim.SGD(model.parameters(), lr=1e-3), num_samples=256,
                          loss_fn=w.loss, weight_grad_mode="forward",
                          recompute_forward=recompute)
    idx = torch.arange(256)

    def step() -> None:
        rw.zero_grad()
        rw.step(w.x, w.y, idx, val=(w.x_val, w.y_val, w.g_val))

    assert_no_growth(step)


def test_the_growth_measurement_sees_a_reweighter_keeping_four_bytes_a_step(
        monkeypatch) -> None:
    from metafair_opt.reweighting import SampleReweighter

    kept = []
    outcome = SampleReweighter._eager_outcome

    def keeping(self, *args, **kwargs):
        out = outcome(self, *args, **kwargs)
        kept.append(out.final_loss)  # a detached float32 scalar
        return out

    monkeypatch.setattr(SampleReweighter, "_eager_outcome", keeping)
    step, _ = make_step("reweighter", make_workload("mlp"))
    assert live_bytes_growth(step, first=10, last=30) == 20 * 4
