"""SampleReweighter's meta-gradient and model update against independent computations (float64).

The weight gradient is read from the table: with ``weight_optimizer="sgd"`` and
``weight_lr=1`` a step moves each row by exactly minus its gradient. Both ways of computing it
(``weight_grad_mode="reverse"``, double backward; ``"forward"``, forward-mode AD) and the
compiled ``torch.func`` form (``compiled=True``) are checked.
"""

from __future__ import annotations

import weakref

import higher
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metafair_opt import SampleReweighter, max_loss_discrepancy, mean_loss_discrepancy
from tests.helpers import REWEIGHTER_MODES, rel_error, reweighter_mode

pytestmark = pytest.mark.usefixtures("float64_default")  # from tests/conftest.py


def tiny_model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def plain_mlp(params: list[Tensor], x: Tensor) -> Tensor:
    w1, b1, w2, b2 = params
    return torch.tanh(x @ w1.T + b1) @ w2.T + b2


def data(seed: int, n: int = 8, n_val: int = 10):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 3, generator=g), torch.randint(0, 2, (n,), generator=g)
    xv, yv = torch.randn(n_val, 3, generator=g), torch.randint(0, 2, (n_val,), generator=g)
    gv = torch.tensor([0, 1] * (n_val // 2))
    return x, y, xv, yv, gv


def meta_objective(params0, logits, idx_inverse, batch, lookahead_lr, meta_loss) -> Tensor:
    """The meta-loss as a function of the batch's weight logits, written out by hand."""
    x, y, xv, yv, gv = batch
    weights = torch.softmax(logits[idx_inverse], dim=0)
    inner = (weights * F.cross_entropy(plain_mlp(params0, x), y, reduction="none")).sum()
    grads = torch.autograd.grad(inner, params0, create_graph=True)
    adapted = [p - lookahead_lr * g for p, g in zip(params0, grads)]
    return meta_loss(F.cross_entropy(plain_mlp(adapted, xv), yv, reduction="none"), gv)


MODES = pytest.mark.parametrize("mode", REWEIGHTER_MODES)


def reweighter_row_gradient(model, batch, idx, lookahead_lr, meta_loss, table=None,
                            mode: str = "reverse") -> Tensor:
    x, y, xv, yv, gv = batch
    rw = SampleReweighter(model, torch.optim.SGD(model.parameters(), lr=0.0), num_samples=20,
                          loss_fn=F.cross_entropy, meta_loss=meta_loss, weight_lr=1.0,
                          weight_optimizer="sgd", lookahead_lr=lookahead_lr,
                          **reweighter_mode(mode))
    if table is not None:
        rw._table.copy_(table)
    before = rw.weights
    rw.step(x, y, idx, val=(xv, yv, gv))
    rows = torch.unique(idx)
    return before[rows] - rw.weights[rows]


@MODES
@pytest.mark.parametrize("meta_loss", [mean_loss_discrepancy, max_loss_discrepancy])
@pytest.mark.parametrize("duplicates", [False, True])
def test_weight_gradient_matches_finite_differences(meta_loss, duplicates: bool, mode,
                                                  index_check) -> None:
    batch = data(seed=1)
    idx = torch.tensor([3, 7, 7, 0, 12, 5, 3, 19]) if duplicates else torch.arange(2, 10)
    rows, inverse = torch.unique(idx, return_inverse=True)
    table = torch.linspace(-0.5, 0.5, 20)
    model = tiny_model(seed=2)
    params0 = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    eps = 1e-6
    numeric = torch.zeros(rows.numel())
    for k in range(rows.numel()):
        values = []
        for sign in (1.0, -1.0):
            logits = table[rows].clone()
            logits[k] += sign * eps
            meta = meta_objective(params0, logits, inverse, batch, 0.7, meta_loss)
            values.append(float(meta.detach()))
        numeric[k] = (values[0] - values[1]) / (2 * eps)
    got = reweighter_row_gradient(model, batch, idx, 0.7, meta_loss, table=table, mode=mode)
    assert rel_error(got, numeric) < 1e-4


@MODES
@pytest.mark.parametrize("meta_loss", [mean_loss_discrepancy, max_loss_discrepancy])
def test_weight_gradient_matches_higher(meta_loss, mode) -> None:
    x, y, xv, yv, gv = batch = data(seed=3)
    idx = torch.arange(4, 12)
    lr = 0.6
    reference_model = tiny_model(seed=4)
    logits = torch.zeros(8, requires_grad=True)
    inner_opt = torch.optim.SGD(reference_model.parameters(), lr=lr)
    with higher.innerloop_ctx(reference_model, inner_opt) as (fmodel, diffopt):
        weights = torch.softmax(logits, dim=0)
        diffopt.step((weights * F.cross_entropy(fmodel(x), y, reduction="none")).sum())
        meta = meta_loss(F.cross_entropy(fmodel(xv), yv, reduction="none"), gv)
        (expected,) = torch.autograd.grad(meta, logits)
    got = reweighter_row_gradient(tiny_model(seed=4), batch, idx, lr, meta_loss, mode=mode)
    assert rel_error(got, expected) < 1e-6
    assert expected.abs().max() > 1e-4  # the check is not trivially zero == zero


@MODES
def test_model_update_matches_hand_computation(mode) -> None:
    x, y, xv, yv, gv = batch = data(seed=5)
    idx = torch.tensor([0, 1, 2, 3, 3, 4, 5, 6])
    rows, inverse = torch.unique(idx, return_inverse=True)
    table = torch.linspace(-1, 1, 20)
    lookahead_lr, weight_lr, model_lr = 0.5, 3.0, 0.2
    model = tiny_model(seed=6)
    params0 = [p.detach().clone().requires_grad_(True) for p in model.parameters()]

    logits = table[rows].clone().requires_grad_(True)
    meta = meta_objective(params0, logits, inverse, batch, lookahead_lr, mean_loss_discrepancy)
    (row_grad,) = torch.autograd.grad(meta, logits)
    new_rows = table[rows] - weight_lr * row_grad
    new_weights = torch.softmax(new_rows[inverse], dim=0)
    final = (new_weights * F.cross_entropy(plain_mlp(params0, x), y, reduction="none")).sum()
    grads = torch.autograd.grad(final, params0)
    expected = [p.detach() - model_lr * g for p, g in zip(params0, grads)]

    rw = SampleReweighter(model, torch.optim.SGD(model.parameters(), lr=model_lr),
                          num_samples=20, loss_fn=F.cross_entropy, weight_lr=weight_lr,
                          weight_optimizer="sgd", lookahead_lr=lookahead_lr,
                          **reweighter_mode(mode))
    rw._table.copy_(table)
    result = rw.step(x, y, idx, val=(xv, yv, gv))
    for got, want in zip(model.parameters(), expected):
        assert torch.allclose(got, want, rtol=0, atol=1e-12)
    assert torch.allclose(rw.weights[rows], new_rows, atol=1e-12)
    assert torch.allclose(result.batch_weights, new_weights * 8, atol=1e-12)
    assert result.loss == pytest.approx(float(final.detach()), abs=1e-12)
    assert result.meta_loss == pytest.approx(float(meta.detach()), abs=1e-12)


def test_lookahead_defaults_to_the_optimizers_current_lr_and_reverse_flips_it() -> None:
    batch = data(seed=7)
    idx = torch.arange(8)
    rows, inverse = torch.unique(idx, return_inverse=True)
    model = tiny_model(seed=8)
    params0 = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    for lookahead, reverse in ((0.3, False), (-0.3, True)):
        logits = torch.zeros(8, requires_grad=True)
        meta = meta_objective(params0, logits, inverse, batch, lookahead, mean_loss_discrepancy)
        (expected,) = torch.autograd.grad(meta, logits)
        m = tiny_model(seed=8)
        opt = torch.optim.SGD(m.parameters(), lr=0.3)
        rw = SampleReweighter(m, opt, num_samples=20, loss_fn=F.cross_entropy, weight_lr=1.0,
                              weight_optimizer="sgd", reverse_lookahead=reverse)
        rw.step(batch[0], batch[1], idx, val=batch[2:])
        assert rel_error(-rw.weights[rows], expected) < 1e-8


def test_adam_weight_update_matches_hand_written_lazy_adam() -> None:
    x, y, xv, yv, gv = batch = data(seed=9)
    model = tiny_model(seed=10)
    rw = SampleReweighter(model, torch.optim.SGD(model.parameters(), lr=0.0), num_samples=20,
                          loss_fn=F.cross_entropy, weight_lr=0.1, weight_optimizer="adam",
                          lookahead_lr=0.5)
    params0 = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    b1, b2, eps = 0.9, 0.999, 1e-8
    table, m, v, t = torch.zeros(20), torch.zeros(20), torch.zeros(20), torch.zeros(20)
    for idx in (torch.arange(0, 8), torch.arange(4, 12)):  # rows 4..7 get a second update
        rows, inverse = torch.unique(idx, return_inverse=True)
        logits = table[rows].clone().requires_grad_(True)
        meta = meta_objective(params0, logits, inverse, batch, 0.5, mean_loss_discrepancy)
        (g,) = torch.autograd.grad(meta, logits)
        t[rows] += 1
        m[rows] = b1 * m[rows] + (1 - b1) * g
        v[rows] = b2 * v[rows] + (1 - b2) * g * g
        m_hat, v_hat = m[rows] / (1 - b1 ** t[rows]), v[rows] / (1 - b2 ** t[rows])
        table[rows] = table[rows] - 0.1 * m_hat / (v_hat.sqrt() + eps)
        rw.step(x, y, idx, val=(xv, yv, gv))
    assert torch.allclose(rw.weights, table, atol=1e-10)
    assert rw.weights[12:].abs().max() == 0  # rows never seen are untouched


class NormDropoutNet(nn.Module):
    """BatchNorm in train mode and dropout: buffers that move and random draws in the step."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.3))
        self.head = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


@pytest.mark.parametrize("weight_optimizer", ["sgd", "adam"])
def test_forward_and_reverse_modes_agree_with_batchnorm_dropout_and_repeats(
    weight_optimizer: str,
) -> None:
    """Three steps, repeated rows, reverse look-ahead: the same weights, moving averages,
    parameters, running statistics and random stream afterwards, to rounding."""
    x, y, xv, yv, gv = data(seed=11, n=8, n_val=10)
    idx = torch.tensor([3, 7, 7, 0, 12, 5, 3, 19])
    outcomes = {}
    for mode in ("reverse", "forward", "recompute"):
        torch.manual_seed(12)
        model = NormDropoutNet().double().train()
        rw = SampleReweighter(model, torch.optim.SGD(model.parameters(), lr=0.1),
                              num_samples=20, loss_fn=F.cross_entropy,
                              weight_optimizer=weight_optimizer, weight_lr=0.5,
                              lookahead_lr=0.4, reverse_lookahead=True, **reweighter_mode(mode))
        for _ in range(3):
            rw.zero_grad()
            rw.step(x, y, idx, val=(xv, yv, gv))
        outcomes[mode] = (rw.to_frame(), [t.detach().clone() for t in model.state_dict().values()],
                          torch.rand(3))
    f_rev, s_rev, r_rev = outcomes["reverse"]
    assert (f_rev["weight"] != 0).sum() == 6  # the rows moved, so the comparison means something
    for mode in ("forward", "recompute"):
        f_fwd, s_fwd, r_fwd = outcomes[mode]
        assert float((f_rev["weight"] - f_fwd["weight"]).abs().max()) < 1e-12
        assert float((f_rev["ema_weighted_loss"] - f_fwd["ema_weighted_loss"]).abs().max()) \
            < 1e-12
        assert (f_rev["times_seen"] == f_fwd["times_seen"]).all()
        # The parameters (the final gradient: recomputed with the same dropout masks) and the
        # running statistics (moved once per step, not once per forward).
        for a, b in zip(s_rev, s_fwd):
            assert torch.allclose(a, b, rtol=0, atol=1e-12)
        assert torch.equal(r_rev, r_fwd)  # the replayed draws leave the generator where it was


def test_auto_mode_picks_forward_for_large_models_only() -> None:
    small = tiny_model(seed=13)
    rw = SampleReweighter(small, torch.optim.SGD(small.parameters(), lr=0.1), num_samples=4,
                          loss_fn=F.cross_entropy)
    assert not rw._forward_mode
    large = nn.Linear(1000, 1000)  # 1,001,000 parameter elements
    rw = SampleReweighter(large, torch.optim.SGD(large.parameters(), lr=0.1), num_samples=4,
                          loss_fn=F.cross_entropy)
    assert rw._forward_mode


def forwards_and_kept_activations(recompute: bool) -> tuple[list[int], list[tuple[int, ...]]]:
    """One forward-mode step: the batch size of every forward through the model, and the shapes
    of the tensors saved for backward that are still alive when the validation forward starts."""
    x, y, xv, yv, gv = data(seed=14)
    model = tiny_model(seed=15)
    rows_seen: list[int] = []
    saved: list[weakref.ref] = []
    alive_at_validation: list[list[tuple[int, ...]]] = []

    def count_rows(_module, args, _output) -> None:
        rows_seen.append(args[0].shape[0])

    def at_validation(_module, args) -> None:
        if args[0].shape[0] == xv.shape[0] and not alive_at_validation:
            alive_at_validation.append([tuple(t.shape) for r in saved
                                        if (t := r()) is not None])

    def pack(t: Tensor) -> Tensor:
        saved.append(weakref.ref(t))
        return t

    model.register_forward_hook(count_rows)
    model.register_forward_pre_hook(at_validation)
    rw = SampleReweighter(model, torch.optim.SGD(model.parameters(), lr=0.1), num_samples=20,
                          loss_fn=F.cross_entropy, weight_optimizer="sgd",
                          weight_grad_mode="forward", recompute_forward=recompute)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        rw.step(x, y, torch.arange(8), val=(xv, yv, gv))
    return rows_seen, alive_at_validation[0]


def test_recompute_forward_runs_the_training_forward_again_and_frees_its_graph() -> None:
    """recompute_forward=True: on a weight-updating step the training batch goes through the
    model three times (the step's forward, the forward-mode pass, the recomputation) instead of
    twice, and the hidden activations the first forward saved for backward are released before
    the validation forward (kept without it)."""
    hidden = (8, 4)  # the tanh output of the training batch, saved by tanh and the 2nd Linear
    rows_seen, alive = forwards_and_kept_activations(recompute=False)
    assert rows_seen == [8, 10, 8] and hidden in alive
    rows_seen, alive = forwards_and_kept_activations(recompute=True)
    assert rows_seen == [8, 10, 8, 8] and hidden not in alive
