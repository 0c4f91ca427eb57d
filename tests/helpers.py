"""Shared test utilities: snapshots for 'nothing changed' checks and vector comparisons."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn


def flat(tensors: Sequence[Tensor | None]) -> Tensor:
    """Concatenate tensors into one vector (None counts as empty)."""
    return torch.cat([t.reshape(-1) for t in tensors if t is not None])


def rel_error(a: Sequence[Tensor | None] | Tensor, b: Sequence[Tensor | None] | Tensor) -> float:
    """||a - b|| / ||b|| over all entries."""
    va = a if isinstance(a, Tensor) else flat(a)
    vb = b if isinstance(b, Tensor) else flat(b)
    return float((va - vb).norm() / vb.norm())


def snapshot(model: nn.Module, *stateful: Any) -> dict[str, Any]:
    """Deep copies of a model's state (parameters, buffers, gradients) and of other state_dicts."""
    return {
        "model": copy.deepcopy(model.state_dict()),
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "others": [copy.deepcopy(s.state_dict()) for s in stateful],
    }


def assert_same_state(before: Any, after: Any) -> None:
    """Bit-identical comparison of nested dicts/lists of tensors and plain values."""
    if isinstance(before, Tensor):
        assert isinstance(after, Tensor)
        assert before.dtype == after.dtype and before.shape == after.shape
        same = torch.equal(before.isnan(), after.isnan()) and torch.equal(
            before.nan_to_num(0.0), after.nan_to_num(0.0)
        ) if before.is_floating_point() else torch.equal(before, after)
        assert same, "a tensor changed"
    elif isinstance(before, dict):
        assert before.keys() == after.keys()
        for k in before:
            assert_same_state(before[k], after[k])
    elif isinstance(before, (list, tuple)):
        assert len(before) == len(after)
        for x, y in zip(before, after):
            assert_same_state(x, y)
    else:
        assert before == after


#: The ways a SampleReweighter can compute its weight gradient, as test parameters
#: ("recompute": the forward mode with ``recompute_forward=True``).
REWEIGHTER_MODES = ("reverse", "forward", "recompute", "compiled")


def reweighter_mode(mode: str) -> dict[str, Any]:
    """SampleReweighter keyword arguments for one of ``REWEIGHTER_MODES``."""
    if mode == "compiled":
        return {"compiled": True}
    if mode == "recompute":
        return {"weight_grad_mode": "forward", "recompute_forward": True}
    return {"weight_grad_mode": mode}


class TwoHeads(nn.Module):
    """A body with two heads of which ``forward`` uses one: the other's parameters are not
    reached by any loss (3 inputs, 4 hidden units, ``outputs`` outputs)."""

    def __init__(self, outputs: int) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.used, self.unused = nn.Linear(4, outputs), nn.Linear(4, outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.used(torch.tanh(self.body(x)))


class CustomSquare(torch.autograd.Function):
    """``x * x`` as a custom autograd.Function (``setup_context`` style, as torch.func needs)."""

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class SquaredHidden(nn.Module):
    """Linear, :class:`CustomSquare`, dropout, Linear (``inputs`` in, ``outputs`` out): a model
    whose second derivatives run through a custom Function's backward."""

    def __init__(self, inputs: int, outputs: int, dropout: float = 0.25) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(inputs, 8), nn.Linear(8, outputs)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.dropout(CustomSquare.apply(self.first(x))))


def spy_on_replay_takes(patch: Any) -> list[bool]:
    """Installs (with ``patch``, a ``pytest.MonkeyPatch``) a spy on the forward replay's
    ``PrimalRecord.take``; the list it returns gets, per call, whether a recorded convolution
    output was taken."""
    from metafair_opt._forward_replay import PrimalRecord

    taken: list[bool] = []
    original = PrimalRecord.take

    def counted(self: PrimalRecord, *args: Any) -> Tensor | None:
        out = original(self, *args)
        taken.append(out is not None)
        return out
    patch.setattr(PrimalRecord, "take", counted)
    return taken


def two_reweighting_steps(model: nn.Module, images: Any, **options: Any
                          ) -> tuple[Tensor, list[Tensor]]:
    """Two ``SampleReweighter`` steps (cross-entropy on three classes, 8 training rows of a
    10-row table, 6 validation rows in two groups) on ``model`` with ``options``; ``images(seed,
    rows)`` makes the inputs. Returns the weights and the model's state."""
    import torch.nn.functional as F

    from metafair_opt import SampleReweighter

    g = torch.Generator().manual_seed(3)
    x, y = images(3, 8), torch.randint(0, 3, (8,), generator=g)
    val = (images(4, 6), torch.randint(0, 3, (6,), generator=g), torch.arange(6) % 2)
    idx = torch.tensor([4, 0, 9, 2, 7, 1, 5, 3])
    rw = SampleReweighter(model, torch.optim.SGD(model.parameters(), lr=0.1), num_samples=10,
                          loss_fn=F.cross_entropy, weight_lr=2.0, lookahead_lr=0.5, **options)
    for _ in range(2):
        rw.zero_grad()
        rw.step(x, y, idx, val=val)
    return rw.weights.clone(), [t.clone() for t in model.state_dict().values()]
