"""GradientAlignmentWrapper(compiled=True): the torch.compile'd torch.func form of the step.

Checked against the same independent references as the eager step (the model written out by
hand with ``torch.autograd.grad``, ``higher``), against the eager wrapper (BatchNorm running
statistics, batch sizes that change), and for its errors. Every test also checks that a graph
was really compiled, so a silent fallback to eager execution would fail it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchopt
from torch import Tensor, nn
from torch._dynamo.utils import counters

from metafair_opt import GradientAlignmentWrapper
from tests.helpers import assert_same_state, rel_error, snapshot
from tests.test_alignment_gradients import (
    bce,
    hand_meta_gradient,
    higher_meta_gradient,
    plain_mlp,
    tiny_batches,
    tiny_model,
)

pytestmark = pytest.mark.usefixtures("float64_default")  # from tests/conftest.py


def compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def compiled_meta_gradient(model: nn.Module, batches, **kwargs) -> list[Tensor]:
    xs, ys, xq, yq = batches
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    aligner = GradientAlignmentWrapper(model, opt, loss_fn=bce, compiled=True, **kwargs)
    aligner.zero_grad()
    aligner.step(support=(xs, ys), query=(xq, yq))
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("inner_steps", [1, 3])
def test_compiled_meta_gradient_matches_hand_written_autograd_and_higher(
    inner_steps: int,
) -> None:
    batches = tiny_batches(seed=21)
    graphs = compiled_graphs()
    got = compiled_meta_gradient(tiny_model(seed=22), batches, inner_lr=0.3,
                                 inner_steps=inner_steps)
    assert compiled_graphs() > graphs
    params0 = [p.detach().clone().requires_grad_(True) for p in tiny_model(seed=22).parameters()]
    assert rel_error(got, hand_meta_gradient(params0, batches, 0.3, inner_steps)) < 1e-10
    assert rel_error(got, higher_meta_gradient(tiny_model(seed=22), batches, 0.3,
                                               inner_steps)) < 1e-10


def test_compiled_first_order_is_query_gradient_at_adapted_parameters() -> None:
    batches = tiny_batches(seed=23)
    xs, ys, xq, yq = batches
    lr = 0.3
    params = [p.detach().clone().requires_grad_(True) for p in tiny_model(seed=24).parameters()]
    grads = torch.autograd.grad(bce(plain_mlp(params, xs), ys), params)
    adapted = [(p - lr * g).detach().requires_grad_(True) for p, g in zip(params, grads)]
    expected = torch.autograd.grad(bce(plain_mlp(adapted, xq), yq), adapted)
    got = compiled_meta_gradient(tiny_model(seed=24), batches, inner_lr=lr, first_order=True)
    assert rel_error(got, expected) < 1e-10
    second_order = hand_meta_gradient(params, batches, lr, 1)
    assert rel_error(got, second_order) > 1e-3  # the check can tell the two apart


def bn_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 1)).double()


def test_compiled_training_equals_eager_with_batchnorm_and_changing_batch_sizes() -> None:
    """Running statistics move once per step as in eager mode; a new batch size recompiles
    (with dynamic shapes) and still gives the eager result; torchopt's SGD traces too."""
    runs = []
    for compiled in (False, True):
        model = bn_model(seed=25)
        # SGD: Adam would blow up the rounding noise of the bias before BatchNorm, whose true
        # gradient is zero, into differences of its learning rate.
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        aligner = GradientAlignmentWrapper(
            model, opt, loss_fn=bce, inner_steps=2, compiled=compiled,
            inner_optimizer=torchopt.sgd(0.2, momentum=0.5))
        g = torch.Generator().manual_seed(26)
        losses = []
        for n_s in (5, 7, 6, 8):
            x, y = torch.randn(16, 4, generator=g), (torch.rand(16, generator=g) > 0.5).double()
            aligner.zero_grad()
            result = aligner.step(support=(x[:n_s], y[:n_s]), query=(x[n_s:], y[n_s:]))
            losses.append([*result.support_losses, result.query_loss])
        runs.append((model.state_dict(), losses))
    (eager_state, eager_losses), (compiled_state, compiled_losses) = runs
    assert torch.tensor(compiled_losses).allclose(torch.tensor(eager_losses), rtol=1e-10)
    assert compiled_state["1.num_batches_tracked"] == 4
    for key, value in eager_state.items():
        assert torch.allclose(compiled_state[key].double(), value.double(), rtol=1e-9,
                              atol=1e-12), key


def test_compiled_bad_loss_raises_its_own_error_and_changes_nothing() -> None:
    xs, ys, xq, yq = tiny_batches(seed=27)
    model = bn_model(seed=28)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def per_sample(output: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(output.squeeze(-1), target, reduction="none")

    aligner = GradientAlignmentWrapper(model, opt, loss_fn=per_sample, compiled=True)
    xs, xq = torch.randn(7, 4), torch.randn(9, 4)
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar \(0-dim\) tensor, but "
                                         r"for the support loss at inner step 1 of 1 it "
                                         r"returned \(7,\)"):
        aligner.step(support=(xs, ys), query=(xq, yq))
    assert_same_state(before, snapshot(model, opt))


def test_step_that_does_not_compile_names_the_fix_and_changes_nothing() -> None:
    """torchopt's Adam does not trace under torch.func + torch.compile (a fake-tensor error in
    torch's fma decomposition): the step says so and points to compiled=False."""
    batches = tiny_batches(seed=29)
    model = tiny_model(seed=30)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    aligner = GradientAlignmentWrapper(model, opt, loss_fn=bce, compiled=True,
                                       inner_optimizer=torchopt.adam(0.01, eps_root=1e-8))
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"torch.compile could not compile this step .*"
                                         r"Nothing was updated. Build the wrapper with "
                                         r"compiled=False"):
        aligner.step(support=batches[:2], query=batches[2:])
    assert_same_state(before, snapshot(model, opt))


def test_compiled_is_refused_with_a_grad_scaler() -> None:
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    with pytest.raises(ValueError, match="compiled=True works in one process without loss "
                                         "scaling; build the wrapper with compiled=False"):
        GradientAlignmentWrapper(model, opt, loss_fn=bce, compiled=True, grad_scaler=scaler)


def test_every_wrapper_of_a_sweep_compiles_past_torch_compiles_recompile_limit() -> None:
    """torch.compile keeps at most 8 variants per code object, then runs it uncompiled; each
    wrapper compiles its own copy, so the ninth configuration in one process still compiles."""
    batches = tiny_batches(seed=31)
    for i in range(9):
        graphs = compiled_graphs()
        got = compiled_meta_gradient(tiny_model(seed=32), batches, inner_lr=0.05 * (i + 1))
        assert compiled_graphs() == graphs + 1, f"wrapper {i} ran uncompiled"
        params0 = [p.detach().clone().requires_grad_(True)
                   for p in tiny_model(seed=32).parameters()]
        assert rel_error(got, hand_meta_gradient(params0, batches, 0.05 * (i + 1), 1)) < 1e-10
