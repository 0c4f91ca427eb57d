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


@pytest.mark.parametrize("variant", ["alignment", "alignment_first_order", "reweighter",
                                     "reweighter_every_5"])
def test_no_tensor_growth_over_many_steps(variant: str) -> None:
    w = make_workload("mlp")
    step, _ = make_step(variant, w)
    for _ in range(10):
        step()
    after_10 = live_tensor_count()
    for _ in range(190):
        step()
    assert live_tensor_count() == after_10
