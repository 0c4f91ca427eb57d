"""GradientAlignmentWrapper(compiled=True): the torch.compile'd torch.func form of the step.

Checked against the same independent references as the eager step (the model written out by
hand with ``torch.autograd.grad``, ``higher``), against the eager wrapper (BatchNorm running
statistics, batch sizes that change, dropout, first order with weight decay, no inner step,
the alignment trace), and for its errors. The tests that compare results also check that a
graph was compiled, so a silent fallback to eager execution would fail them; the tests of
compile failures check that the error came out of one.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
import torchopt
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from metafair_opt import GradientAlignmentWrapper
from tests.helpers import SquaredHidden, TwoHeads, assert_same_state, rel_error, snapshot
from tests.test_alignment_gradients import (
    bce,
    hand_meta_gradient,
    higher_meta_gradient,
    plain_mlp,
    tiny_batches,
    tiny_model,
    wrapper_meta_gradient,
)

pytestmark = pytest.mark.usefixtures("float64_default")  # from tests/conftest.py


def compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def compiled_meta_gradient(model: nn.Module, batches, **kwargs) -> list[Tensor | None]:
    return wrapper_meta_gradient(model, batches, compiled=True, **kwargs)


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
    graphs = compiled_graphs()
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
    assert compiled_graphs() >= graphs + 2  # the first batch size, then dynamic shapes
    assert torch.tensor(compiled_losses).allclose(torch.tensor(eager_losses), rtol=1e-10)
    assert compiled_state["1.num_batches_tracked"] == 4
    for key, value in eager_state.items():
        assert torch.allclose(compiled_state[key].double(), value.double(), rtol=1e-9,
                              atol=1e-12), key


def momentum_state(model: nn.Module) -> torch.optim.Optimizer:
    """An SGD-with-momentum optimizer that has stepped once and holds gradients, so a failed
    step that touched its state or the gradients would show."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    opt.step()
    return opt


def per_sample_bce(output: Tensor, target: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(output.squeeze(-1), target, reduction="none")


def test_compiled_bad_loss_raises_its_own_error_and_changes_nothing() -> None:
    model = bn_model(seed=28)
    opt = momentum_state(model)
    aligner = GradientAlignmentWrapper(model, opt, loss_fn=per_sample_bce, compiled=True)
    g = torch.Generator().manual_seed(27)
    xs, xq = torch.randn(7, 4, generator=g), torch.randn(9, 4, generator=g)
    ys, yq = torch.ones(7), torch.zeros(9)
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar \(0-dim\) tensor, but "
                                         r"for the support loss at inner step 1 of 1 it "
                                         r"returned \(7,\)") as raised:
        aligner.step(support=(xs, ys), query=(xq, yq))
    assert isinstance(raised.value.__context__, torch._dynamo.exc.TorchDynamoException)
    assert_same_state(before, snapshot(model, opt))


def test_step_that_does_not_compile_names_the_fix_and_changes_nothing() -> None:
    """A loss that breaks the graph (here on purpose; in practice code torch.compile cannot
    trace) cannot become one graph: the step says so and points to compiled=False."""
    model = bn_model(seed=30)
    opt = momentum_state(model)

    def untraceable_loss(output: Tensor, target: Tensor) -> Tensor:
        torch._dynamo.graph_break()  # a no-op in eager mode
        return bce(output, target)

    aligner = GradientAlignmentWrapper(model, opt, loss_fn=untraceable_loss,
                                       compiled=True)
    xs, ys, xq, yq = tiny_batches(seed=29, inputs=4)
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"torch.compile could not compile this step .*"
                                         r"Nothing was updated. Build the "
                                         r"GradientAlignmentWrapper with compiled=False"):
        aligner.step(support=(xs, ys), query=(xq, yq))
    assert_same_state(before, snapshot(model, opt))
    eager = GradientAlignmentWrapper(model, opt, loss_fn=untraceable_loss)
    assert eager.step(support=(xs, ys), query=(xq, yq)).query_loss is not None


def test_a_compiled_meta_gradient_that_differs_from_eager_is_refused_on_the_first_step() -> None:
    """torch.compile (2.15) does not differentiate a custom autograd.Function's backward again,
    so the second-order term through it vanishes: the first compiled step is checked against
    the eager one, and here it is refused with nothing changed (the random generator, which
    the model's dropout draws from, included). A first step that fails on a NaN input compares
    nothing, so the check waits for the next step."""
    torch.manual_seed(31)
    model = SquaredHidden(4, 1)
    opt = momentum_state(model)
    xs, ys, xq, yq = tiny_batches(seed=32, inputs=4)
    aligner = GradientAlignmentWrapper(model, opt, loss_fn=bce, inner_lr=0.5, compiled=True)
    before, draws = snapshot(model, opt), torch.get_rng_state()
    nan_xs = xs.clone()
    nan_xs[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="The support loss at inner step 1 of 1 is nan"):
        aligner.step(support=(nan_xs, ys), query=(xq, yq))
    assert not aligner._compiled_checked
    draws = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"compiled=True computed a different meta-gradient "
                                         r"from eager autograd on the first step \(relative "
                                         r"difference .*Nothing was updated. Build the "
                                         r"GradientAlignmentWrapper with compiled=False."):
        aligner.step(support=(xs, ys), query=(xq, yq))
    assert_same_state(before, snapshot(model, opt))
    assert torch.equal(torch.get_rng_state(), draws)
    # First order has no second derivative to lose: it compiles, is checked and runs.
    first_order = GradientAlignmentWrapper(model, opt, loss_fn=bce, inner_lr=0.5,
                                           first_order=True, compiled=True)
    assert first_order.step(support=(xs, ys), query=(xq, yq)).query_loss is not None
    assert first_order._compiled_checked


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_first_step_check_accepts_dropout_with_track_alignment_and_bfloat16(dtype) -> None:
    """Legitimate compiled steps pass the first-step check: dropout with track_alignment (the
    eager alignment pass must not shift the query's dropout draws) and bfloat16 parameters
    (compared at low precision's tolerance)."""
    torch.manual_seed(38)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 1)).to(dtype)
    aligner = GradientAlignmentWrapper(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                       loss_fn=bce, compiled=True,
                                       track_alignment=dtype == torch.float32)
    xs, ys, xq, yq = (t.to(dtype) for t in tiny_batches(seed=35, inputs=4))
    result = aligner.step(support=(xs, ys), query=(xq, yq))
    assert aligner._compiled_checked and not result.skipped


def test_compiled_nan_loss_names_the_loss_and_changes_nothing() -> None:
    model = bn_model(seed=33)
    opt = momentum_state(model)
    aligner = GradientAlignmentWrapper(model, opt, loss_fn=bce, compiled=True)
    xs, ys, xq, yq = tiny_batches(seed=34, inputs=4)
    xs = xs.clone()
    xs[2, 1] = float("nan")
    before = snapshot(model, opt)
    with pytest.raises(FloatingPointError, match="The support loss at inner step 1 of 1 is nan"):
        aligner.step(support=(xs, ys), query=(xq, yq))
    assert_same_state(before, snapshot(model, opt))


def params_of(model: nn.Module) -> list[Tensor]:
    return [p.detach() for p in model.parameters()]


def eager_and_compiled(build, steps: int = 2, **kwargs):
    """Train a fresh ``build()`` for ``steps`` steps eagerly and compiled, same batches and
    seeds; return both (model, last result) pairs."""
    runs = []
    for compiled in (False, True):
        model = build()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        aligner = GradientAlignmentWrapper(model, opt, loss_fn=bce, compiled=compiled,
                                           **kwargs)
        g = torch.Generator().manual_seed(35)
        torch.manual_seed(36)  # the dropout draws
        for _ in range(steps):
            x, y = torch.randn(16, 4, generator=g), (torch.rand(16, generator=g) > 0.5).double()
            aligner.zero_grad()
            result = aligner.step(support=(x[:6], y[:6]), query=(x[6:], y[6:]))
        runs.append((model, result))
    return runs


@pytest.mark.parametrize("kwargs", [
    {"inner_steps": 0},
    {"track_alignment": True},
    {"first_order": True, "inner_steps": 2,
     "inner_optimizer": torchopt.sgd(0.2, momentum=0.5, weight_decay=0.1)},
], ids=["no_inner_step", "track_alignment", "first_order_weight_decay"])
def test_compiled_equals_eager(kwargs) -> None:
    graphs = compiled_graphs()
    (eager, eager_result), (compiled, compiled_result) = eager_and_compiled(
        lambda: bn_model(seed=37), **kwargs)
    assert compiled_graphs() > graphs
    assert rel_error(params_of(compiled), params_of(eager)) < 1e-12
    assert compiled_result.query_loss == pytest.approx(eager_result.query_loss, rel=1e-12)
    if kwargs.get("track_alignment"):
        assert compiled_result.alignment == pytest.approx(eager_result.alignment, rel=1e-12)


def test_compiled_dropout_draws_as_eager_mode_does() -> None:
    def build() -> nn.Module:
        torch.manual_seed(38)
        return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.5),
                             nn.Linear(16, 1)).double()

    graphs = compiled_graphs()
    (eager, _), (compiled, _) = eager_and_compiled(build)
    assert compiled_graphs() > graphs
    assert rel_error(params_of(compiled), params_of(eager)) < 1e-12
    # Dropout matters here: without it, the same step gives other parameters.
    (plain, _), _ = eager_and_compiled(lambda: build().eval(), steps=2)
    assert rel_error(params_of(plain), params_of(eager)) > 1e-6


def test_compiled_gives_unreached_parameters_a_zero_gradient() -> None:
    """The documented difference: torch.func fills the gradient of a parameter the step does
    not reach with zeros, where the eager step leaves it None."""
    grads = {}
    for compiled in (False, True):
        torch.manual_seed(39)
        model = TwoHeads(outputs=1).double()
        grads[compiled] = compiled_meta_gradient(model, tiny_batches(seed=40)) if compiled \
            else wrapper_meta_gradient(model, tiny_batches(seed=40))
    assert grads[False][-1] is None and grads[False][-2] is None
    assert torch.equal(grads[True][-1], torch.zeros(1)) and not grads[True][-2].any()
    assert rel_error(grads[True][:4], grads[False][:4]) < 1e-10


def test_compiled_is_refused_with_a_grad_scaler() -> None:
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    with pytest.raises(ValueError, match="compiled=True works in one process without loss "
                                         "scaling; build the GradientAlignmentWrapper with "
                                         "compiled=False"):
        GradientAlignmentWrapper(model, opt, loss_fn=bce, compiled=True, grad_scaler=scaler)


@pytest.mark.usefixtures("own_compile_cache")
def test_every_wrapper_of_a_sweep_compiles_past_torch_compiles_recompile_limit() -> None:
    """torch.compile keeps at most 8 variants per code object, then (with fullgraph=True)
    fails; each wrapper compiles its own copy, so the ninth configuration in one process still
    compiles. The inner rate is an input of the graph, not a constant in it: after the first,
    the wrappers of this sweep over inner_lr find their graph in Inductor's cache (this test
    session's own) instead of compiling it again (about 4 s each on this MLP, on 2 CPU cores)."""
    batches = tiny_batches(seed=31)
    misses = []
    for i in range(9):
        graphs = compiled_graphs()
        got = compiled_meta_gradient(tiny_model(seed=32), batches, inner_lr=0.05 * (i + 1))
        assert compiled_graphs() == graphs + 1, f"wrapper {i} ran uncompiled"
        misses.append(counters["inductor"]["fxgraph_cache_miss"])
        params0 = [p.detach().clone().requires_grad_(True)
                   for p in tiny_model(seed=32).parameters()]
        assert rel_error(got, hand_meta_gradient(params0, batches, 0.05 * (i + 1), 1)) < 1e-10
    assert misses[1:] == [misses[0]] * 8, misses


def test_recompile_limit_names_the_limit_and_the_fix() -> None:
    batches = tiny_batches(seed=41)
    model = tiny_model(seed=42)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    aligner = GradientAlignmentWrapper(model, opt, loss_fn=bce, compiled=True)
    with torch._dynamo.config.patch(recompile_limit=1, automatic_dynamic_shapes=False):
        aligner.step(support=batches[:2], query=batches[2:])
        before = snapshot(model, opt)
        xs, ys, xq, yq = tiny_batches(seed=43, n_s=5)  # a new shape: a second compile
        with pytest.raises(ValueError, match=r"FailOnRecompileLimitHit: its recompile limit was "
                                             r"reached.*Nothing was updated. Build the "
                                             r"GradientAlignmentWrapper with compiled=False"):
            aligner.step(support=(xs, ys), query=(xq, yq))
    assert_same_state(before, snapshot(model, opt))


@pytest.mark.usefixtures("fresh_torch_compile")
@pytest.mark.parametrize("donated_buffer", [True, False])
def test_a_model_compiled_by_the_user_steps_first_order_and_is_told_what_to_do_for_second(
    donated_buffer: bool,
) -> None:
    """A model compiled with an aot_autograd backend (inductor, the default, is one; aot_eager
    here, which compiles in seconds) has a backward torch cannot differentiate again. The
    first-order step runs and equals the uncompiled model's; a second-order step raises with
    the settings that work and changes nothing, whichever of torch's two errors it met (with
    donated buffers, torch's own suggests turning them off; then the double-backward one
    comes); the backend "eager", which does differentiate twice, is not refused."""
    batches = tiny_batches(seed=61)
    counter = CompileCounterWithBackend("aot_eager")
    with torch._functorch.config.patch(donated_buffer=donated_buffer):
        got = wrapper_meta_gradient(torch.compile(tiny_model(seed=62), backend=counter),
                                    batches, inner_lr=0.3, first_order=True)
        assert counter.frame_count > 0
        expected = wrapper_meta_gradient(tiny_model(seed=62), batches, inner_lr=0.3,
                                         first_order=True)
        assert rel_error(got, expected) < 1e-12

        model = torch.compile(tiny_model(seed=62), backend="aot_eager")
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        xs, ys, xq, yq = batches
        GradientAlignmentWrapper(model, opt, loss_fn=bce, first_order=True).step((xs, ys),
                                                                                 (xq, yq))
        before = snapshot(model, opt)  # with the first step's momentum buffers and gradients
        message = re.escape(
            "This GradientAlignmentWrapper step differentiates the model's backward, and the "
            "model (or a module inside it, or the loss function) was compiled with "
            "torch.compile, whose compiled backward cannot be differentiated again (aot_autograd "
            "does not support double backward; turning off its donated buffers does not change "
            "that). Nothing was updated. Pass the model uncompiled (a torch.compile'd module "
            "keeps it as ._orig_mod; one compiled in place with .compile() has to be built again "
            "without it) with compiled=True and recompute_support=False, which compiles the "
            "whole meta-step, or set first_order=True.")
        for recompute_support in (False, True):
            aligner = GradientAlignmentWrapper(model, opt, loss_fn=bce, inner_lr=0.3,
                                               recompute_support=recompute_support)
            with pytest.raises(RuntimeError, match=message) as raised:
                aligner.step((xs, ys), (xq, yq))
            assert_same_state(before, snapshot(model, opt))
            torch_says = ("compiled with non-empty donated buffers" if donated_buffer
                          else "does not currently support double backward")
            assert torch_says in str(raised.value.__cause__)

    eager_backend = wrapper_meta_gradient(torch.compile(tiny_model(seed=62), backend="eager"),
                                          batches, inner_lr=0.3)
    expected = wrapper_meta_gradient(tiny_model(seed=62), batches, inner_lr=0.3)
    assert rel_error(eager_backend, expected) < 1e-12
