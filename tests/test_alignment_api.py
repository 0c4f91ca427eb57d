"""GradientAlignmentWrapper behaviour: buffers, frozen parameters, inputs, errors, checkpoints."""

from __future__ import annotations

import copy
import io
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metafair_opt import ByGroup, GradientAlignmentWrapper, Proportion
from tests.helpers import assert_same_state, snapshot


def bce(output: Tensor, target: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(output.squeeze(-1), target)


def bn_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1))


def batch(seed: int = 0, n: int = 24, d: int = 4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * 2 + 1
    y = (torch.rand(n, generator=g) > 0.5).float()
    groups = (torch.arange(n) % 3 == 0).long()
    return x, y, groups


@pytest.mark.parametrize("inner_steps", [0, 1, 3])
def test_batchnorm_running_stats_move_exactly_once_per_step(inner_steps: int) -> None:
    model = bn_model()
    bn = model[0]
    aligner = GradientAlignmentWrapper(
        model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=bce,
        inner_steps=inner_steps, track_alignment=True,
    )
    x, y, groups = batch()
    query = groups == 0
    expected_mean = bn.running_mean.clone()
    expected_var = bn.running_var.clone()
    for step in range(1, 3):
        aligner.zero_grad()
        aligner.step_batch(x, y, groups, split=ByGroup(support_group=1))
        xq = x[query]
        expected_mean = 0.9 * expected_mean + 0.1 * xq.mean(0)
        expected_var = 0.9 * expected_var + 0.1 * xq.var(0, unbiased=True)
        assert int(bn.num_batches_tracked) == step
        assert torch.allclose(bn.running_mean, expected_mean, atol=1e-6)
        assert torch.allclose(bn.running_var, expected_var, atol=1e-5)


def test_frozen_parameters_are_untouched_and_get_no_gradient() -> None:
    model = bn_model()
    model[1].weight.requires_grad_(False)
    frozen_before = model[1].weight.detach().clone()
    trainable_before = model[3].weight.detach().clone()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    aligner = GradientAlignmentWrapper(model, opt, loss_fn=bce, inner_steps=2)
    x, y, groups = batch()
    aligner.zero_grad()
    aligner.step_batch(x, y, groups, split=ByGroup())
    assert torch.equal(model[1].weight, frozen_before)
    assert model[1].weight.grad is None
    assert not torch.equal(model[3].weight, trainable_before)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(2, 4)
        self.out = nn.Linear(4, 1)

    def forward(self, numeric: Tensor, extra: Tensor) -> Tensor:
        return self.out(torch.relu(self.a(numeric) + self.b(extra)))


@pytest.mark.parametrize("form", ["dict", "tuple"])
def test_dict_and_tuple_inputs_match_each_other(form: str) -> None:
    g = torch.Generator().manual_seed(3)
    numeric, extra = torch.randn(20, 3, generator=g), torch.randn(20, 2, generator=g)
    y = (torch.rand(20, generator=g) > 0.5).float()
    groups = (torch.arange(20) % 2).long()

    def run(x) -> list[Tensor]:
        torch.manual_seed(0)
        model = TwoInputs()
        aligner = GradientAlignmentWrapper(
            model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=bce
        )
        aligner.zero_grad()
        aligner.step_batch(x, y, groups, split=ByGroup())
        return [p.detach().clone() for p in model.parameters()]

    x = {"numeric": numeric, "extra": extra} if form == "dict" else (numeric, extra)
    got = run(x)

    torch.manual_seed(0)
    reference = TwoInputs()
    s, q = groups == 1, groups == 0
    names = [n for n, _ in reference.named_parameters()]
    params = list(reference.parameters())
    call = torch.func.functional_call
    grads = torch.autograd.grad(bce(reference(numeric[s], extra[s]), y[s]), params,
                                create_graph=True)
    adapted = dict(zip(names, [p - 0.01 * gr for p, gr in zip(params, grads)]))
    meta = torch.autograd.grad(bce(call(reference, adapted, (numeric[q], extra[q])), y[q]),
                               params)
    expected = [p.detach() - 0.1 * gr for p, gr in zip(params, meta)]
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, atol=1e-6)


def test_alignment_is_cosine_of_group_gradients() -> None:
    model = bn_model().eval()  # eval: the gradients below need no buffer bookkeeping
    aligner = GradientAlignmentWrapper(
        model, torch.optim.SGD(model.parameters(), lr=0.0), loss_fn=bce, track_alignment=True
    )
    x, y, groups = batch(seed=4)
    s, q = groups == 1, groups == 0
    params = list(model.parameters())
    gs = torch.cat([g.flatten() for g in torch.autograd.grad(bce(model(x[s]), y[s]), params)])
    gq = torch.cat([g.flatten() for g in torch.autograd.grad(bce(model(x[q]), y[q]), params)])
    expected = float(gs @ gq / (gs.norm() * gq.norm()))
    result = aligner.step_batch(x, y, groups, split=ByGroup())
    assert result.alignment == pytest.approx(expected, abs=1e-6)
    assert (result.n_support, result.n_query) == (int(s.sum()), int(q.sum()))
    assert len(result.support_losses) == 1
    support_loss = float(bce(model(x[s]), y[s]).detach())
    assert result.support_losses[0] == pytest.approx(support_loss, abs=1e-6)
    sgd = torch.optim.SGD(model.parameters(), lr=0.0)
    untracked = GradientAlignmentWrapper(model, sgd, loss_fn=bce)
    assert untracked.step_batch(x, y, groups, split=ByGroup()).alignment is None


# ---------------------------------------------------------------------------- bad input
def trained_setup():
    """A model and Adam optimizer with non-trivial state and gradients present."""
    model = bn_model(seed=5)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    aligner = GradientAlignmentWrapper(model, opt, loss_fn=bce, inner_steps=2)
    x, y, groups = batch(seed=6)
    for _ in range(2):
        aligner.zero_grad()
        aligner.step_batch(x, y, groups, split=ByGroup())
    return model, opt, aligner, (x, y, groups)


def test_non_scalar_loss_is_rejected_and_nothing_changes() -> None:
    model, opt, aligner, (x, y, groups) = trained_setup()
    aligner.loss_fn = lambda o, t: F.binary_cross_entropy_with_logits(
        o.squeeze(-1), t, reduction="none"
    )
    before = snapshot(model, opt, aligner)
    with pytest.raises(ValueError, match=re.escape("loss_fn must return a scalar (0-dim) tensor")):
        aligner.step_batch(x, y, groups, split=ByGroup())
    assert_same_state(before, snapshot(model, opt, aligner))


def test_mismatched_batch_sizes_name_both_shapes() -> None:
    model, opt, aligner, (x, y, _) = trained_setup()
    before = snapshot(model, opt, aligner)
    with pytest.raises(ValueError, match=re.escape(
        "support x and support y have different batch sizes: support x has shape (5, 4) "
        "(5 rows) and support y has shape (4,) (4 rows)"
    )):
        aligner.step(support=(x[:5], y[:4]), query=(x[5:], y[5:]))
    with pytest.raises(ValueError, match=re.escape("x has shape (24, 4) (24 rows) and y has "
                                                   "shape (23,) (23 rows)")):
        aligner.step_batch(x, y[:-1], torch.zeros(24), split=ByGroup())
    with pytest.raises(ValueError, match="groups has 10 rows but x and y have 24"):
        aligner.step_batch(x, y, torch.zeros(10), split=ByGroup())
    assert_same_state(before, snapshot(model, opt, aligner))


def test_optimizer_missing_parameters_is_rejected_at_construction() -> None:
    model = bn_model()
    opt = torch.optim.SGD(model[3].parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"The optimizer does not hold 4 trainable parameter\(s\)"
                                         r" of the model: 0.weight, 0.bias, 1.weight, 1.bias"):
        GradientAlignmentWrapper(model, opt, loss_fn=bce)


@pytest.mark.parametrize(
    ("poison", "message"),
    [
        ("support", "The support loss at inner step 1 of 2 is nan"),
        ("query", "The query loss is nan"),
        ("second_inner", "The support loss at inner step 2 of 2 is inf"),
    ],
)
@pytest.mark.parametrize("recompute", [False, True], ids=["kept", "recomputed"])
def test_non_finite_loss_names_the_loss_and_changes_nothing(poison: str, message: str,
                                                            recompute: bool) -> None:
    model, opt, aligner, (x, y, groups) = trained_setup()
    aligner.recompute_support = recompute
    s, q = groups == 1, groups == 0
    xs, xq = x[s].clone(), x[q].clone()
    if poison == "support":
        xs[0, 0] = float("nan")
    elif poison == "query":
        xq[0, 0] = float("nan")
    else:
        calls = {"n": 0}

        def loss_inf_on_second_call(o: Tensor, t: Tensor) -> Tensor:
            calls["n"] += 1
            return bce(o, t) * (float("inf") if calls["n"] == 2 else 1.0)

        aligner.loss_fn = loss_inf_on_second_call
    before = snapshot(model, opt, aligner)
    with pytest.raises(FloatingPointError, match=re.escape(message)):
        aligner.step(support=(xs, y[s]), query=(xq, y[q]))
    assert_same_state(before, snapshot(model, opt, aligner))


def test_empty_support_policies() -> None:
    x, y, _ = batch(seed=7)
    only_group_0 = torch.zeros(24, dtype=torch.long)

    model, opt, aligner, _ = trained_setup()
    aligner.on_empty = "error"
    before = snapshot(model, opt, aligner)
    with pytest.raises(ValueError, match=re.escape(
        "The support set is empty in this batch (0 support rows, 24 query rows). Sample "
        "batches that hold every group, for example with metafair_opt.GroupBalancedBatchSampler"
    )):
        aligner.step_batch(x, y, only_group_0, split=ByGroup(1))
    assert_same_state(before, snapshot(model, opt, aligner))

    aligner.on_empty = "skip"
    result = aligner.step_batch(x, y, only_group_0, split=ByGroup(1))
    assert result.skipped and result.query_loss is None and aligner.skipped_count == 1
    assert_same_state(before["model"], model.state_dict())

    # fallback: an ordinary step on the rows present, warned once per wrapper
    aligner.on_empty = "fallback"
    reference = bn_model(seed=5)
    reference.load_state_dict(model.state_dict())
    ref_opt = torch.optim.Adam(reference.parameters(), lr=0.01)
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # no shared moment tensors
    with pytest.warns(RuntimeWarning, match="ordinary training step on the rows present"):
        aligner.zero_grad()
        result = aligner.step_batch(x, y, only_group_0, split=ByGroup(1))
    assert result.fallback and aligner.fallback_count == 1
    ref_opt.zero_grad()
    bce(reference(x), y).backward()
    ref_opt.step()
    for p, q in zip(model.state_dict().values(), reference.state_dict().values()):
        assert torch.allclose(p.float(), q.float(), atol=1e-7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert aligner.step_batch(x, y, only_group_0, split=ByGroup(1)).fallback


def test_failed_split_leaves_split_state_unchanged() -> None:
    _model, _opt, aligner, (x, y, groups) = trained_setup()
    split = Proportion(0.2, seed=0)
    state = split.state_dict()["generator"].clone()
    aligner.loss_fn = lambda o, t: bce(o, t) * float("nan")
    with pytest.raises(FloatingPointError):
        aligner.step_batch(x, y, groups, split=split)
    assert torch.equal(split.state_dict()["generator"], state)


# ---------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_continues_identically() -> None:
    x, y, groups = batch(seed=8, n=40)

    def fresh():
        model = bn_model(seed=9)
        opt = torch.optim.Adam(model.parameters(), lr=0.02)
        aligner = GradientAlignmentWrapper(model, opt, loss_fn=bce, inner_steps=2,
                                           on_empty="fallback")
        return model, opt, aligner, Proportion(0.2, seed=3)

    def train(aligner, split, steps):
        for _ in range(steps):
            aligner.zero_grad()
            aligner.step_batch(x, y, groups, split=split)

    model_a, _, aligner_a, split_a = fresh()
    train(aligner_a, split_a, 6)

    model_b, _, aligner_b, split_b = fresh()
    train(aligner_b, split_b, 3)
    buffer = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "aligner": aligner_b.state_dict(),
                "split": split_b.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)

    model_c, _, aligner_c, split_c = fresh()
    model_c.load_state_dict(saved["model"])
    aligner_c.load_state_dict(saved["aligner"])
    split_c.load_state_dict(saved["split"])
    assert aligner_c.step_count == 3
    train(aligner_c, split_c, 3)
    assert aligner_c.step_count == 6
    for a, c in zip(model_a.state_dict().values(), model_c.state_dict().values()):
        assert torch.equal(a, c)


def test_loading_a_different_configuration_warns() -> None:
    model = bn_model()
    a = GradientAlignmentWrapper(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                 loss_fn=bce, inner_steps=1)
    b = GradientAlignmentWrapper(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                 loss_fn=bce, inner_steps=3)
    with pytest.warns(UserWarning, match="inner_steps"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(KeyError, match="Not a GradientAlignmentWrapper state_dict"):
        b.load_state_dict({"optimizer": {}})


def test_invalid_configuration_is_rejected() -> None:
    model = bn_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="inner_steps must be a non-negative integer"):
        GradientAlignmentWrapper(model, opt, loss_fn=bce, inner_steps=-1)
    with pytest.raises(ValueError, match="on_empty must be 'fallback', 'skip' or 'error'"):
        GradientAlignmentWrapper(model, opt, loss_fn=bce, on_empty="ignore")  # type: ignore[arg-type]


class FailingStep(torch.optim.SGD):
    """An optimizer whose step raises, as a misconfigured or closure-needing one would."""

    def step(self, closure=None):  # type: ignore[override]
        raise RuntimeError("optimizer step failed")


def test_failing_optimizer_step_restores_gradients_and_buffers() -> None:
    model = bn_model(seed=12)
    opt = FailingStep(model.parameters(), lr=0.1)
    aligner = GradientAlignmentWrapper(model, opt, loss_fn=bce)
    x, y, groups = batch(seed=13)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = snapshot(model, opt)
    with pytest.raises(RuntimeError, match="optimizer step failed"):
        aligner.step_batch(x, y, groups, split=ByGroup())
    assert_same_state(before, snapshot(model, opt))
    assert aligner.step_count == 0


def test_non_finite_meta_gradient_is_caught_before_the_update() -> None:
    model, opt, aligner, (x, y, groups) = trained_setup()
    aligner.inner_steps = 0  # with inner steps the NaN would first reach a loss
    # finite value, NaN gradient: d sqrt(u)/du at u = 0 is inf, times 0 gives NaN
    aligner.loss_fn = lambda o, t: bce(o, t) + 0.0 * torch.sqrt((o * 0.0).sum())
    before = snapshot(model, opt, aligner)
    with pytest.raises(FloatingPointError, match="The gradient to apply holds NaN or inf"):
        aligner.step_batch(x, y, groups, split=ByGroup())
    assert_same_state(before, snapshot(model, opt, aligner))


def test_splits_accept_any_target_shape_when_they_ignore_labels() -> None:
    model = bn_model()
    aligner = GradientAlignmentWrapper(
        model, torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=lambda o, t: F.binary_cross_entropy_with_logits(o, t),
    )
    x, y, groups = batch(seed=14)
    soft_targets = torch.stack([y, 1 - y], 1)[:, :1]  # (B, 1) targets
    result = aligner.step_batch(x, soft_targets, groups, split=ByGroup())
    assert result.n_support == int((groups == 1).sum())
    one_hot = torch.nn.functional.one_hot(y.long(), 2).float()
    support, _ = ByGroup()(one_hot, groups)
    assert torch.equal(support, groups == 1)
