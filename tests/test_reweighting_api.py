"""SampleReweighter behaviour: plain-step equivalence, errors, checkpoints, pruning, learning."""

from __future__ import annotations

import copy
import io
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metafair_opt import SampleReweighter, mean_loss_discrepancy
from tests.helpers import REWEIGHTER_MODES, assert_same_state, reweighter_mode, snapshot


def bn_model(seed: int = 0, classes: int = 2) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, classes))


def data(seed: int = 0, n: int = 16, n_val: int = 12):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 5, generator=g), torch.randint(0, 2, (n,), generator=g)
    xv, yv = torch.randn(n_val, 5, generator=g), torch.randint(0, 2, (n_val,), generator=g)
    gv = torch.arange(n_val) % 2
    return x, y, xv, yv, gv


def test_fresh_table_with_zero_weight_lr_is_a_plain_step_on_the_mean_loss() -> None:
    model, reference = bn_model(1), bn_model(1)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    ref_opt = torch.optim.Adam(reference.parameters(), lr=0.01)
    rw = SampleReweighter(model, opt, num_samples=100, loss_fn=F.cross_entropy, weight_lr=0.0)
    for step in range(3):
        x, y, xv, yv, gv = data(seed=step)
        rw.zero_grad()
        result = rw.step(x, y, torch.arange(16) + step, val=(xv, yv, gv))
        ref_opt.zero_grad()
        loss = F.cross_entropy(reference(x), y)
        loss.backward()
        ref_opt.step()
        assert result.loss == pytest.approx(float(loss.detach()), abs=1e-6)
        assert torch.allclose(result.batch_weights, torch.ones(16))
    for a, b in zip(model.state_dict().values(), reference.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)  # BatchNorm stats included
    assert rw.weights.abs().max() == 0


def test_batchnorm_stats_move_once_per_step() -> None:
    model = bn_model(2)
    rw = SampleReweighter(model, torch.optim.SGD(model.parameters(), lr=0.1), num_samples=50,
                          loss_fn=F.cross_entropy)
    x, y, xv, yv, gv = data(seed=3)
    rw.step(x, y, torch.arange(16), val=(xv, yv, gv))
    rw.step(x, y, torch.arange(16), val=(xv, yv, gv))
    assert int(model[1].num_batches_tracked) == 2


def test_result_reports_group_losses_of_the_validation_batch() -> None:
    model = bn_model(4)
    rw = SampleReweighter(model, torch.optim.SGD(model.parameters(), lr=0.0), num_samples=50,
                          loss_fn=F.cross_entropy, lookahead_lr=0.0, weight_lr=0.0)
    x, y, xv, yv, gv = data(seed=5)
    result = rw.step(x, y, torch.arange(16), val=(xv, yv, gv))
    scratch = copy.deepcopy(model)  # lookahead_lr=0: the look-ahead parameters are theta
    losses = F.cross_entropy(scratch(xv), yv, reduction="none").detach()
    assert set(result.group_losses) == {0, 1}
    for group in (0, 1):
        expected = float(losses[gv == group].mean())
        assert result.group_losses[group] == pytest.approx(expected, abs=1e-6)
    assert result.meta_loss == pytest.approx(float(mean_loss_discrepancy(losses, gv)), abs=1e-6)


def test_meta_losses_by_hand() -> None:
    from metafair_opt import cross_entropy, max_loss_discrepancy

    losses = torch.tensor([1.0, 3.0, 2.0, 6.0, 0.5])
    groups = torch.tensor([0, 0, 1, 1, 2])
    # group means: 2.0, 4.0, 0.5; overall mean 2.5
    assert float(max_loss_discrepancy(losses, groups)) == pytest.approx(3.5)
    assert float(mean_loss_discrepancy(losses, groups)) == pytest.approx((0.5 + 1.5 + 2.0) / 3)
    assert float(cross_entropy(losses, groups)) == pytest.approx(2.5)


def test_unknown_meta_loss_is_rejected() -> None:
    model = bn_model()
    with pytest.raises(ValueError, match="Unknown meta_loss 'fairness'; use one of"):
        SampleReweighter(model, torch.optim.SGD(model.parameters(), lr=0.1), num_samples=10,
                         loss_fn=F.cross_entropy, meta_loss="fairness")


def test_custom_callable_meta_loss_is_used() -> None:
    calls = []

    def worst_group_loss(losses: Tensor, groups: Tensor) -> Tensor:
        calls.append(groups.clone())
        return torch.stack([losses[groups == g].mean() for g in groups.unique()]).max()

    model = bn_model()
    rw = SampleReweighter(model, torch.optim.SGD(model.parameters(), lr=0.1), num_samples=50,
                          loss_fn=F.cross_entropy, meta_loss=worst_group_loss)
    x, y, xv, yv, gv = data()
    result = rw.step(x, y, torch.arange(16), val=(xv, yv, gv))
    assert len(calls) == 1 and torch.equal(calls[0], gv)
    assert result.meta_loss == pytest.approx(max(result.group_losses.values()), abs=1e-6)


def test_meta_every_updates_weights_on_every_kth_step_only() -> None:
    model, reference = bn_model(11), bn_model(11)
    rw = SampleReweighter(model, torch.optim.SGD(model.parameters(), lr=0.1), num_samples=40,
                          loss_fn=F.cross_entropy, weight_lr=0.1, meta_every=2)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    idx = torch.arange(16)
    x, y, xv, yv, gv = data(seed=12)
    rw.step(x, y, idx, val=(xv, yv, gv))  # step 0: a meta step
    after_meta = rw.weights
    assert after_meta[:16].abs().max() > 0
    reference.load_state_dict(model.state_dict())
    rw.zero_grad()
    result = rw.step(x, y, idx, val=None)  # step 1: plain weighted step with the current weights
    assert torch.equal(rw.weights, after_meta)
    assert result.group_losses == {} and result.meta_loss != result.meta_loss  # NaN
    weights = torch.softmax(after_meta[:16], dim=0)
    ref_opt.zero_grad()
    (weights * F.cross_entropy(reference(x), y, reduction="none")).sum().backward()
    ref_opt.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(TypeError, match=r"val must be a validation batch"):
        rw.step(x, y, idx, val=None)  # step 2 is a meta step again
    with pytest.raises(ValueError, match="meta_every must be a positive integer"):
        SampleReweighter(model, torch.optim.SGD(model.parameters(), lr=0.1), num_samples=4,
                         loss_fn=F.cross_entropy, meta_every=0)


# ---------------------------------------------------------------------------- bad input
def trained(seed: int = 6, mode: str = "reverse"):
    model = bn_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    rw = SampleReweighter(model, opt, num_samples=100, loss_fn=F.cross_entropy, weight_lr=0.1,
                          **reweighter_mode(mode))
    for step in range(2):
        x, y, xv, yv, gv = data(seed=step)
        rw.zero_grad()
        rw.step(x, y, torch.arange(16) * 3 + step, val=(xv, yv, gv))
    return model, opt, rw


def test_index_out_of_range_names_the_range_and_changes_nothing(index_check) -> None:
    model, opt, rw = trained()
    x, y, xv, yv, gv = data(seed=9)
    before = snapshot(model, opt, rw)
    idx = torch.arange(16)
    idx[5] = 100
    with pytest.raises(IndexError, match=re.escape(
        "Sample index 100 is outside the weight table's range [0, 100)"
    )):
        rw.step(x, y, idx, val=(xv, yv, gv))
    idx[5] = -1
    with pytest.raises(IndexError, match=re.escape("Sample index -1 is outside")):
        rw.step(x, y, idx, val=(xv, yv, gv))
    with pytest.raises(ValueError, match="idx has 15 entries but the batch has 16 rows"):
        rw.step(x, y, torch.arange(15), val=(xv, yv, gv))
    assert_same_state(before, snapshot(model, opt, rw))


def test_a_small_cpu_batch_without_repeats_is_checked_without_a_sort(index_check,
                                                                     monkeypatch) -> None:
    """The two ways of the fixture are real: torch.unique sorts the batch's indices only by
    sorting, or where an index repeats (for the positions of its rows)."""
    rw = trained()[2]
    x, y, xv, yv, gv = data(seed=9)
    sorted_indices = []
    unique = torch.unique

    def counting(t, *args, **kwargs):
        if not kwargs.get("return_counts"):  # the meta-loss's group means ask for counts
            sorted_indices.append(t.clone())
        return unique(t, *args, **kwargs)

    monkeypatch.setattr(torch, "unique", counting)
    rw.step(x, y, torch.arange(16) + 50, val=(xv, yv, gv))
    repeated = torch.arange(16) + 50
    repeated[3] = repeated[7]
    rw.step(x, y, repeated, val=(xv, yv, gv))
    expected = [repeated] if index_check == "on the host" else [torch.arange(16) + 50, repeated]
    assert len(sorted_indices) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(sorted_indices, expected))


def test_empty_training_batch_is_refused_and_changes_nothing() -> None:
    model, opt, rw = trained()
    x, y, xv, yv, gv = data(seed=9)
    before = snapshot(model, opt, rw)
    with pytest.raises(ValueError, match=re.escape(
        "The training batch is empty; a step needs at least one row."
    )):
        rw.step(x[:0], y[:0], torch.arange(0), val=(xv, yv, gv))
    assert_same_state(before, snapshot(model, opt, rw))


@pytest.mark.parametrize("mode", ["reverse", "compiled"])
@pytest.mark.parametrize("kind", ["mean_reduced", "no_reduction_argument"])
def test_loss_without_per_sample_reduction_is_explained(kind: str, mode: str) -> None:
    model, opt, rw = trained(mode=mode)
    if kind == "mean_reduced":
        rw.loss_fn = lambda output, target, reduction="mean": F.cross_entropy(output, target)
        message = ("loss_fn(output, target, reduction='none') must return one loss per sample, "
                   "shape (16,); for the training loss it returned ()")
    else:
        rw.loss_fn = lambda output, target: F.cross_entropy(output, target)
        message = ("loss_fn must give one loss per sample: SampleReweighter calls "
                   "loss_fn(output, target, reduction='none')")
    x, y, xv, yv, gv = data(seed=9)
    before = snapshot(model, opt, rw)
    with pytest.raises(ValueError, match=re.escape(message)):
        rw.step(x, y, torch.arange(16), val=(xv, yv, gv))
    assert_same_state(before, snapshot(model, opt, rw))


@pytest.mark.parametrize("mode", ["reverse", "compiled"])
def test_validation_batch_with_one_group_points_to_the_balanced_sampler(mode: str) -> None:
    model, opt, rw = trained(mode=mode)
    x, y, xv, yv, _ = data(seed=9)
    before = snapshot(model, opt, rw)
    with pytest.raises(ValueError, match=re.escape(
        "The validation batch holds 1 group(s), but the mean_loss_discrepancy meta-loss compares "
        "groups and needs at least two. Draw validation batches with "
        "metafair_opt.GroupBalancedBatchSampler."
    )):
        rw.step(x, y, torch.arange(16), val=(xv, yv, torch.zeros(12, dtype=torch.long)))
    assert_same_state(before, snapshot(model, opt, rw))


@pytest.mark.parametrize("mode", REWEIGHTER_MODES)
@pytest.mark.parametrize(("where", "message"), [
    ("train", "The training loss is a non-finite value"),
    ("val", "The validation loss is a non-finite value"),
])
def test_non_finite_loss_raises_and_changes_nothing(where: str, message: str, mode: str) -> None:
    model, opt, rw = trained(mode=mode)
    x, y, xv, yv, gv = data(seed=9)
    (x if where == "train" else xv)[3, 1] = float("nan")
    before = snapshot(model, opt, rw)
    with pytest.raises(FloatingPointError, match=re.escape(message)):
        rw.step(x, y, torch.arange(16), val=(xv, yv, gv))
    assert_same_state(before, snapshot(model, opt, rw))


class InfiniteGradientForUnequalWeights(torch.autograd.Function):
    """The identity on per-sample losses, whose backward is infinite when the per-sample weights
    coming back are not all equal: a fresh table's uniform weights give a finite look-ahead
    gradient, the updated (unequal) weights an infinite final gradient, and every loss, the
    meta-loss and the weight gradient stay finite."""

    @staticmethod
    def forward(losses: Tensor) -> Tensor:
        return losses.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        unequal = (grad.max() > grad.min()).to(grad.dtype)
        return grad / (1.0 - unequal)

    @staticmethod
    def jvp(ctx, tangent: Tensor) -> Tensor:
        return tangent


@pytest.mark.parametrize("mode", ["reverse", "forward", "recompute"])
def test_non_finite_final_gradient_with_finite_losses_raises_and_changes_nothing(
    mode: str,
) -> None:
    """Not with compiled=True: torch.compile does not differentiate a custom Function's backward
    again, and the first compiled step's check against eager mode refuses that (tested in
    tests/test_reweighting_compiled.py)."""

    def loss_fn(output: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        losses = F.cross_entropy(output, target, reduction=reduction)
        # The training batch only (16 rows; the validation batch has 12).
        return (InfiniteGradientForUnequalWeights.apply(losses) if len(target) == 16
                else losses)

    model = bn_model(seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rw = SampleReweighter(model, opt, num_samples=100, loss_fn=loss_fn, weight_lr=0.5,
                          **reweighter_mode(mode))
    x, y, xv, yv, gv = data(seed=4)
    before = snapshot(model, opt, rw)
    with pytest.raises(FloatingPointError, match=re.escape(
            "The gradient to apply holds NaN or inf values although the losses are finite. "
            "Nothing was updated.")):
        rw.step(x, y, torch.arange(16), val=(xv, yv, gv))
    assert_same_state(before, snapshot(model, opt, rw))


class SquareWithoutJvp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class NoJvpNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        return SquareWithoutJvp.apply(self.linear(x))


def test_forward_mode_without_forward_ad_points_to_reverse_mode() -> None:
    torch.manual_seed(0)
    model = NoJvpNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rw = SampleReweighter(model, opt, num_samples=16, loss_fn=F.cross_entropy,
                          weight_grad_mode="forward")
    x, y, xv, yv, gv = data(seed=9)
    before = snapshot(model, opt, rw)
    with pytest.raises(ValueError, match=re.escape(
        "weight_grad_mode='forward' needs forward-mode AD through the model and loss_fn, and "
        "torch refused: You must implement the jvp function")) as caught:
        rw.step(x, y, torch.arange(16), val=(xv, yv, gv))
    assert "weight_grad_mode='reverse'" in str(caught.value)
    assert_same_state(before, snapshot(model, opt, rw))
    reverse = SampleReweighter(model, opt, num_samples=16, loss_fn=F.cross_entropy,
                               weight_grad_mode="reverse")
    assert reverse.step(x, y, torch.arange(16), val=(xv, yv, gv)).meta_loss > 0


@pytest.mark.parametrize("mode", [{"weight_grad_mode": "reverse"}, {"compiled": True}])
def test_recompute_forward_is_refused_with_the_reverse_mode(mode: dict) -> None:
    model = bn_model()
    with pytest.raises(ValueError, match=re.escape(
            "recompute_forward=True frees the training graph between the forward-mode weight "
            "gradient's passes; the reverse mode (weight_grad_mode='reverse', and compiled=True) "
            "needs that graph until the weight gradient is taken. Use weight_grad_mode='auto' "
            "or 'forward' with compiled=False, or recompute_forward=False.")):
        SampleReweighter(model, torch.optim.SGD(model.parameters(), lr=0.1), num_samples=4,
                         loss_fn=F.cross_entropy, recompute_forward=True, **mode)
    # With "auto" it takes the forward mode whatever the model's size.
    assert SampleReweighter(model, torch.optim.SGD(model.parameters(), lr=0.1), num_samples=4,
                            loss_fn=F.cross_entropy, recompute_forward=True)._forward_mode


def test_unknown_weight_grad_mode_is_rejected() -> None:
    model = bn_model()
    with pytest.raises(ValueError, match="weight_grad_mode must be 'auto', 'reverse' or "
                                         "'forward'; got 'backward'"):
        SampleReweighter(model, torch.optim.SGD(model.parameters(), lr=0.1), num_samples=4,
                         loss_fn=F.cross_entropy, weight_grad_mode="backward")


# ---------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_continues_identically() -> None:
    batches = [data(seed=s) for s in range(6)]
    indices = [torch.randperm(100, generator=torch.Generator().manual_seed(s))[:16]
               for s in range(6)]

    def fresh():
        model = bn_model(7)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
        return model, SampleReweighter(model, opt, num_samples=100, loss_fn=F.cross_entropy,
                                       weight_lr=0.2)

    def train(rw, steps):
        for (x, y, xv, yv, gv), idx in steps:
            rw.zero_grad()
            rw.step(x, y, idx, val=(xv, yv, gv))

    plan = list(zip(batches, indices))
    model_a, rw_a = fresh()
    train(rw_a, plan)

    model_b, rw_b = fresh()
    train(rw_b, plan[:3])
    buffer = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "rw": rw_b.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    model_c, rw_c = fresh()
    model_c.load_state_dict(saved["model"])
    rw_c.load_state_dict(saved["rw"])
    train(rw_c, plan[3:])

    for a, c in zip(model_a.state_dict().values(), model_c.state_dict().values()):
        assert torch.equal(a, c)
    assert_same_state(rw_a.state_dict(), rw_c.state_dict())
    assert rw_a.weights.abs().max() > 0


def test_loading_a_table_of_another_size_is_rejected() -> None:
    _, _, rw = trained()
    model = bn_model()
    other = SampleReweighter(model, torch.optim.SGD(model.parameters(), lr=0.1),
                             num_samples=50, loss_fn=F.cross_entropy)
    with pytest.raises(ValueError, match="The saved weight table has 100 rows but this "
                                         "reweighter has num_samples=50"):
        other.load_state_dict(rw.state_dict())


# ---------------------------------------------------------------------------- pruning
def frozen_zero_reweighter(num_samples: int, **options) -> SampleReweighter:
    """A zero linear model with every learning rate 0: a row's normalised weighted loss is its
    target squared, so the moving averages are known in advance."""
    model = nn.Linear(1, 1)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    return SampleReweighter(model, torch.optim.SGD(model.parameters(), lr=0.0),
                            num_samples=num_samples, loss_fn=F.mse_loss,
                            meta_loss="cross_entropy", weight_lr=0.0, lookahead_lr=0.0,
                            **options)


def test_prune_and_keep_indices_on_known_losses() -> None:
    """Zero model, zero learning rates: each example's weighted-loss EMA is its own y**2."""
    rw = frozen_zero_reweighter(10)
    targets = torch.tensor([3.0, -1.0, 0.5, 2.0, -0.2, 4.0, 1.5, -2.5, 0.1, 5.0])
    for idx in (torch.arange(0, 6), torch.arange(4, 10), torch.arange(0, 6)):
        x = torch.zeros(idx.numel(), 1)
        rw.step(x, targets[idx].unsqueeze(1), idx,
                val=(torch.zeros(2, 1), torch.zeros(2, 1), torch.tensor([0, 1])))
    frame = rw.to_frame()
    assert list(frame.columns) == ["index", "weight", "ema_weighted_loss", "times_seen"]
    assert frame["times_seen"].tolist() == [2, 2, 2, 2, 3, 3, 1, 1, 1, 1]
    assert torch.allclose(torch.tensor(frame["ema_weighted_loss"].to_numpy()), targets**2)
    assert rw.prune(3).tolist() == [8, 4, 2]  # y**2 = 0.01, 0.04, 0.25
    assert rw.keep_indices(0.7).tolist() == [0, 1, 3, 5, 6, 7, 9]
    with pytest.raises(ValueError, match=r"Cannot prune 11 examples: 10 of 10 have been seen"):
        rw.prune(11)


def test_prune_only_considers_seen_examples() -> None:
    model = nn.Linear(1, 1)
    rw = SampleReweighter(model, torch.optim.SGD(model.parameters(), lr=0.0), num_samples=10,
                          loss_fn=F.mse_loss, meta_loss="cross_entropy", weight_lr=0.0)
    rw.step(torch.zeros(3, 1), torch.ones(3, 1), torch.tensor([1, 2, 3]),
            val=(torch.zeros(2, 1), torch.zeros(2, 1), torch.tensor([0, 1])))
    assert sorted(rw.prune(3).tolist()) == [1, 2, 3]
    assert rw.keep_indices(0.9).numel() == 9  # one seen example dropped, unseen ones kept
    with pytest.raises(ValueError, match="3 of 10 have been seen"):
        rw.prune(4)


# ---------------------------------------------------------------------------- behaviour
def synthetic(n: int, protected_share: float, seed: int):
    """Group 1 follows a different, harder label rule than group 0."""
    g = torch.Generator().manual_seed(seed)
    groups = (torch.rand(n, generator=g) < protected_share).long()
    x = torch.randn(n, 6, generator=g)
    rule_0 = torch.tensor([1.5, -1.0, 0.5, 0.0, 0.0, 0.0])
    rule_1 = torch.tensor([0.0, 0.5, -1.0, 1.5, 1.0, 0.0])
    logits = torch.where(groups.bool(), x @ rule_1, x @ rule_0)
    y = (torch.rand(n, generator=g) < torch.sigmoid(3 * logits)).long()
    return x, y, groups


def train_synthetic(weight_lr: float, seed: int) -> tuple[Tensor, Tensor, float]:
    x, y, groups = synthetic(2000, 0.1, seed=100)
    xv, yv, gv = synthetic(400, 0.5, seed=200)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rw = SampleReweighter(model, opt, num_samples=2000, loss_fn=F.cross_entropy,
                          weight_lr=weight_lr)
    train_draw = torch.Generator().manual_seed(seed)
    val_draw = torch.Generator().manual_seed(seed + 1)
    for _ in range(300):
        idx = torch.randint(0, 2000, (64,), generator=train_draw)
        val_idx = torch.randint(0, 400, (64,), generator=val_draw)
        rw.zero_grad()
        rw.step(x[idx], y[idx], idx, val=(xv[val_idx], yv[val_idx], gv[val_idx]))
    with torch.no_grad():
        val_losses = F.cross_entropy(model(xv), yv, reduction="none")
    return rw.weights[groups == 1], rw.weights[groups == 0], float(
        mean_loss_discrepancy(val_losses, gv)
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_learned_weights_favour_the_harder_minority_and_reduce_the_discrepancy(seed) -> None:
    """Measured (seeds 0, 1, 2; Adam weight_lr=0.05, 300 steps of 64, about 10 epochs):
    minority minus majority mean logit 0.32 / 0.35 / 0.35; validation MeanLossD with uniform
    weights 0.684 / 0.545 / 0.591 and learned weights 0.404 / 0.257 / 0.352."""
    minority, majority, learned = train_synthetic(weight_lr=0.05, seed=seed)
    uniform_minority, _, uniform = train_synthetic(weight_lr=0.0, seed=seed)
    assert uniform_minority.abs().max() == 0
    assert float(minority.mean() - majority.mean()) > 0.2
    assert learned < uniform - 0.15


class FailingStep(torch.optim.SGD):
    def step(self, closure=None):  # type: ignore[override]
        raise RuntimeError("optimizer step failed")


def test_failing_optimizer_step_leaves_weights_and_tables_unchanged() -> None:
    model = bn_model(13)
    rw = SampleReweighter(model, FailingStep(model.parameters(), lr=0.1), num_samples=50,
                          loss_fn=F.cross_entropy, weight_lr=0.1)
    x, y, xv, yv, gv = data(seed=14)
    before = snapshot(model, rw.optimizer, rw)
    with pytest.raises(RuntimeError, match="optimizer step failed"):
        rw.step(x, y, torch.arange(16), val=(xv, yv, gv))
    assert_same_state(before, snapshot(model, rw.optimizer, rw))


def test_ema_blends_visits_and_averages_duplicates(index_check) -> None:
    """Zero model and learning rates: the normalised weighted loss of row i is its y**2."""
    rw = frozen_zero_reweighter(4, ema_decay=0.75)
    val = (torch.zeros(2, 1), torch.zeros(2, 1), torch.tensor([0, 1]))

    def visit(idx: list[int], targets: list[float]) -> None:
        rw.step(torch.zeros(len(idx), 1), torch.tensor(targets).unsqueeze(1),
                torch.tensor(idx), val=val)

    visit([0, 1, 2], [1.0, 2.0, 3.0])           # first visits: the values themselves
    visit([0, 1, 1], [3.0, 1.0, 3.0])           # row 1 twice in one batch: mean of 1 and 9
    frame = rw.to_frame().set_index("index")
    assert frame.loc[0, "ema_weighted_loss"] == pytest.approx(0.75 * 1 + 0.25 * 9)
    assert frame.loc[1, "ema_weighted_loss"] == pytest.approx(0.75 * 4 + 0.25 * 5)
    assert frame.loc[2, "ema_weighted_loss"] == pytest.approx(9.0)
    assert frame["times_seen"].tolist() == [2, 3, 1, 0]
    assert np.isnan(frame.loc[3, "ema_weighted_loss"])
