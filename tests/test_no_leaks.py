"""No growth: the live tensors after 200 steps are the live tensors after 10 (no timing)."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch

from metafair_opt.benchmark import make_step, make_workload


def live_tensor_count() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on some lazy torch objects warns
        warnings.simplefilter("ignore")
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def assert_no_growth(step) -> None:
    """The live tensors after 200 calls of ``step`` are those after 10."""
    for _ in range(10):
        step()
    after_10 = live_tensor_count()
    for _ in range(190):
        step()
    assert live_tensor_count() == after_10


@pytest.mark.parametrize("variant", ["alignment", "alignment_first_order", "reweighter",
                                     "reweighter_every_5", "alignment_compiled",
                                     "alignment_recompute"])
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
