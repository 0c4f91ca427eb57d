"""SampleReweighter(compiled=True): the torch.compile'd torch.func form of a weight-updating step.

Its weight gradient and model update are checked against finite differences, ``higher`` and a
hand computation in tests/test_reweighting_gradients.py (the ``compiled`` mode), its bad-input
errors in tests/test_reweighting_api.py. Here: against the eager reweighter over several steps
(BatchNorm, dropout, repeated indices, Adam, batch sizes that change, ``meta_every``, a
learning-rate schedule, a callable meta-loss), and its own errors. The tests that compare results
also check that a graph was compiled, so a silent fallback to eager execution would fail them.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from metafair_opt import SampleReweighter, max_loss_discrepancy
from tests.helpers import SquaredHidden, TwoHeads, assert_same_state, snapshot
from tests.test_reweighting_gradients import NormDropoutNet, data

pytestmark = pytest.mark.usefixtures("float64_default")  # from tests/conftest.py


def compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def batches(steps: int, sizes: tuple[int, ...] = (8,)):
    """``steps`` training batches (sizes taken in turn), indices with repeats, validation data."""
    out = []
    for step in range(steps):
        n = sizes[step % len(sizes)]
        x, y, xv, yv, gv = data(seed=50 + step, n=n, n_val=10)
        idx = torch.arange(n) * 2 + step
        idx[1] = idx[0]  # a repeated example
        out.append((x, y, idx, (xv, yv, gv)))
    return out


def train(compiled: bool, steps: int = 3, sizes: tuple[int, ...] = (8,), lr_schedule=None,
          dropout: bool = True, **options):
    """Train a fresh NormDropoutNet (BatchNorm and dropout) with the same batches and seeds;
    return the reweighter's table, the model's state, the last result and the next draw."""
    torch.manual_seed(51)
    model = NormDropoutNet().double().train()
    if not dropout:
        model.body[3] = nn.Identity()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    settings = {"weight_lr": 0.5, "lookahead_lr": 0.4, **options}
    rw = SampleReweighter(model, opt, num_samples=40, loss_fn=F.cross_entropy,
                          compiled=compiled, **settings)
    result = None
    for step, (x, y, idx, val) in enumerate(batches(steps, sizes)):
        if lr_schedule is not None:
            opt.param_groups[0]["lr"] = lr_schedule(step)
        rw.zero_grad()
        result = rw.step(x, y, idx, val=val)
    return (rw.to_frame(), [t.detach().clone() for t in model.state_dict().values()], result,
            torch.rand(3))


def assert_same_training(eager, compiled) -> None:
    (f_eager, s_eager, r_eager, draw_eager), (f_comp, s_comp, r_comp, draw_comp) = eager, compiled
    assert (f_eager["weight"] != 0).sum() > 4  # rows moved, so the comparison means something
    assert float((f_eager["weight"] - f_comp["weight"]).abs().max()) < 1e-10
    assert float((f_eager["ema_weighted_loss"] - f_comp["ema_weighted_loss"]).abs().max()) < 1e-10
    assert (f_eager["times_seen"] == f_comp["times_seen"]).all()
    for a, b in zip(s_eager, s_comp):  # parameters and running statistics
        assert torch.allclose(a, b, rtol=0, atol=1e-10)
    assert r_comp.loss == pytest.approx(r_eager.loss, abs=1e-10)
    assert r_comp.meta_loss == pytest.approx(r_eager.meta_loss, abs=1e-10)
    assert r_comp.group_losses == pytest.approx(r_eager.group_losses, abs=1e-10)
    assert torch.allclose(r_comp.batch_weights, r_eager.batch_weights, atol=1e-10)
    assert torch.equal(draw_eager, draw_comp)  # the dropout draws came from the same stream


@pytest.mark.parametrize("options", [
    {"weight_optimizer": "sgd"},
    {"weight_optimizer": "adam", "reverse_lookahead": True},
    {"meta_loss": max_loss_discrepancy, "weight_optimizer": "sgd"},
], ids=["sgd", "adam_reverse_lookahead", "callable_meta_loss"])
def test_compiled_training_equals_eager(options) -> None:
    """BatchNorm statistics moving once per step, dropout, a repeated index, momentum."""
    eager = train(compiled=False, **options)
    graphs = compiled_graphs()
    compiled = train(compiled=True, **options)
    assert compiled_graphs() > graphs
    assert_same_training(eager, compiled)


def test_compiled_equals_eager_with_changing_batch_sizes_and_meta_every() -> None:
    """A new batch size recompiles (then with dynamic shapes); the plain weighted steps between
    weight updates stay eager. Without dropout: under torch.func with dynamic shapes it does
    not trace in torch 2.15 (documented)."""
    options = {"meta_every": 2, "weight_optimizer": "adam", "dropout": False}
    eager = train(compiled=False, steps=5, sizes=(8, 6, 10), **options)
    graphs = compiled_graphs()
    compiled = train(compiled=True, steps=5, sizes=(8, 6, 10), **options)
    assert compiled_graphs() > graphs
    assert_same_training(eager, compiled)


def test_a_learning_rate_schedule_does_not_recompile() -> None:
    """The look-ahead follows the optimizer's learning rate; it enters the graph as a tensor,
    so a schedule that changes it every step compiles once."""
    schedule = [0.1, 0.08, 0.05, 0.03, 0.02].__getitem__
    # SGD on the weights: lazily created Adam state would add a second graph on step two.
    options = {"lr_schedule": schedule, "lookahead_lr": None, "weight_optimizer": "sgd"}
    eager = train(compiled=False, steps=5, **options)
    graphs = compiled_graphs()
    compiled = train(compiled=True, steps=5, **options)
    assert compiled_graphs() == graphs + 1  # this reweighter's own graph, once
    assert_same_training(eager, compiled)


@pytest.mark.usefixtures("own_compile_cache")
def test_a_sweep_over_the_weight_rate_compiles_one_graph() -> None:
    """The weights' rate enters the graph as a tensor too: after the first reweighter of a
    sweep over weight_lr, the others find their graph in Inductor's cache (this test
    session's own) instead of compiling it again, and train as the eager reweighter does (Adam
    weights; the SGD weights' tensor rate is compared with eager training in the schedule
    test)."""
    misses = []
    for weight_lr in (0.5, 0.2, 0.05):
        options = {"weight_lr": weight_lr, "weight_optimizer": "adam", "dropout": False}
        graphs = compiled_graphs()
        compiled = train(compiled=True, steps=1, **options)
        assert compiled_graphs() == graphs + 1
        misses.append(counters["inductor"]["fxgraph_cache_miss"])
        assert_same_training(train(compiled=False, steps=1, **options), compiled)
    assert misses[1:] == [misses[0]] * 2, misses


def test_compiled_gives_unreached_parameters_a_zero_gradient() -> None:
    """The documented difference: torch.func fills the gradient of a parameter the step does
    not reach with zeros, where the eager step leaves it None."""
    x, y, xv, yv, gv = data(seed=52)
    grads = {}
    for compiled in (False, True):
        torch.manual_seed(53)
        model = TwoHeads(outputs=2).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        rw = SampleReweighter(model, opt, num_samples=8, loss_fn=F.cross_entropy,
                              compiled=compiled)
        rw.step(x, y, torch.arange(8), val=(xv, yv, gv))
        grads[compiled] = [p.grad for p in model.parameters()]
    assert grads[False][-1] is None and grads[False][-2] is None
    assert not grads[True][-1].any() and not grads[True][-2].any()
    for eager, compiled in zip(grads[False][:4], grads[True][:4]):
        assert torch.allclose(eager, compiled, rtol=0, atol=1e-12)


def test_meta_loss_that_does_not_compile_names_the_fix_and_changes_nothing() -> None:
    """A meta-loss that breaks the graph (here on purpose; in practice code torch.compile cannot
    trace) cannot become one graph: the step says so, points to compiled=False, and leaves the
    model, optimizer, tables and random generator as they were."""
    def untraceable(losses: Tensor, groups: Tensor) -> Tensor:
        torch._dynamo.graph_break()  # a no-op in eager mode
        return max_loss_discrepancy(losses, groups)

    torch.manual_seed(54)
    model = NormDropoutNet().double().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    rw = SampleReweighter(model, opt, num_samples=40, loss_fn=F.cross_entropy,
                          meta_loss=untraceable, compiled=True)
    x, y, idx, val = batches(1)[0]
    before, draws = snapshot(model, opt, rw), torch.get_rng_state()
    with pytest.raises(ValueError, match=r"torch.compile could not compile this step .*"
                                         r"Nothing was updated. Build the SampleReweighter "
                                         r"with compiled=False"):
        rw.step(x, y, idx, val=val)
    assert_same_state(before, snapshot(model, opt, rw))
    # The eager re-run that looks for an input error drew dropout masks: the generator is put
    # back, so a run that goes on with compiled=False draws what it would have drawn.
    assert torch.equal(torch.get_rng_state(), draws)
    rw.compiled = False  # the same step in eager autograd runs
    assert rw.step(x, y, idx, val=val).meta_loss >= 0


def test_a_compiled_weight_gradient_that_differs_from_eager_is_refused_on_the_first_step(
) -> None:
    """torch.compile (2.15) does not differentiate a custom autograd.Function's backward again,
    so the reverse-mode weight gradient through it vanishes: the first compiled step is checked
    against the eager one, and here it is refused with nothing changed (the random generator
    included); eager mode runs the same step."""
    torch.manual_seed(55)
    model = SquaredHidden(3, 2).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    rw = SampleReweighter(model, opt, num_samples=40, loss_fn=F.cross_entropy, weight_lr=0.5,
                          compiled=True)
    x, y, idx, val = batches(1)[0]
    before, draws = snapshot(model, opt, rw), torch.get_rng_state()
    with pytest.raises(ValueError, match=re.escape(
            "compiled=True computed a different weight gradient from eager autograd on the "
            "first step (relative difference ") + r"0\.\d+, more than rounding\)\. .*"
            + re.escape("Nothing was updated. Build the SampleReweighter with compiled=False.")):
        rw.step(x, y, idx, val=val)
    assert_same_state(before, snapshot(model, opt, rw))
    assert torch.equal(torch.get_rng_state(), draws)
    rw.compiled = False
    assert rw.step(x, y, idx, val=val).batch_weights.std() > 0  # the weights did move


def test_compiled_is_refused_with_a_grad_scaler_or_the_forward_mode() -> None:
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    with pytest.raises(ValueError, match=re.escape(
            "compiled=True works in one process without loss scaling; build the "
            "SampleReweighter with compiled=False for grad_scaler")):
        SampleReweighter(model, opt, num_samples=4, loss_fn=F.cross_entropy, compiled=True,
                         grad_scaler=scaler)
    with pytest.raises(ValueError, match=re.escape(
            "compiled=True takes the weight gradient in reverse mode; use "
            "weight_grad_mode='auto' or 'reverse' with it")):
        SampleReweighter(model, opt, num_samples=4, loss_fn=F.cross_entropy, compiled=True,
                         weight_grad_mode="forward")


def small_net() -> nn.Module:
    torch.manual_seed(71)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))


@pytest.mark.usefixtures("fresh_torch_compile")
@pytest.mark.parametrize("donated_buffer", [True, False])
def test_a_model_compiled_by_the_user_is_told_what_to_do_in_reverse_mode(
    donated_buffer: bool,
) -> None:
    """A model compiled with an aot_autograd backend (inductor, the default, is one; aot_eager
    here) has a backward torch cannot differentiate again, as the reverse mode does: the step
    raises with the settings that work and changes nothing, whichever of torch's two errors it
    met. The forward mode, which the message offers, then steps as on the uncompiled model.
    (Reverse mode comes first: once a forward-mode step has fed the compiled model dual
    tensors, torch.compile runs it eagerly from then on, and the reverse mode no longer fails.)
    """
    x, y, xv, yv, gv = data(seed=70)
    idx, val = torch.arange(8), (xv, yv, gv)

    def trained_once(model: nn.Module) -> torch.optim.Optimizer:
        """A plain step first, so that there are momentum buffers and gradients to keep."""
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        return opt

    def reweighter(model: nn.Module, opt: torch.optim.Optimizer, mode: str) -> SampleReweighter:
        return SampleReweighter(model, opt, num_samples=8, loss_fn=F.cross_entropy,
                                weight_lr=0.5, weight_grad_mode=mode)

    with torch._functorch.config.patch(donated_buffer=donated_buffer):
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(small_net(), backend=counter)
        opt = trained_once(compiled)
        assert counter.frame_count > 0
        reverse = reweighter(compiled, opt, "reverse")
        before = snapshot(compiled, opt, reverse)
        with pytest.raises(RuntimeError, match=re.escape(
                "This SampleReweighter step differentiates the model's backward, and the model "
                "(or a module inside it, or the loss function) was compiled with torch.compile, "
                "whose compiled backward cannot be differentiated again (aot_autograd does not "
                "support double backward; turning off its donated buffers does not change "
                "that). Nothing was updated. Pass the model uncompiled (a torch.compile'd "
                "module keeps it as ._orig_mod; one compiled in place with .compile() has to be "
                "built again without it) with compiled=True, which compiles the whole "
                "weight-updating step, or use weight_grad_mode='forward', which differentiates "
                "no backward (torch.compile runs a compiled model eagerly once the forward mode "
                "has fed it dual tensors; should torch refuse its donated buffers, set "
                "torch._functorch.config.donated_buffer = False, as its message says).")) as raised:
            reverse.step(x, y, idx, val)
        assert_same_state(before, snapshot(compiled, opt, reverse))
        torch_says = ("compiled with non-empty donated buffers" if donated_buffer
                      else "does not currently support double backward")
        assert torch_says in str(raised.value.__cause__)

        forward = reweighter(compiled, opt, "forward")
        before = snapshot(compiled, opt, forward)
        if donated_buffer:  # torch's own error, whose advice is the one to follow here
            with pytest.raises(RuntimeError, match=re.escape(
                    "or set torch._functorch.config.donated_buffer=False to disable donated "
                    "buffer.")):
                forward.step(x, y, idx, val)
            assert_same_state(before, snapshot(compiled, opt, forward))
    with torch._functorch.config.patch(donated_buffer=False):
        forward.step(x, y, idx, val)
        eager_model = small_net()
        eager = reweighter(eager_model, trained_once(eager_model), "forward")
        eager.step(x, y, idx, val)
        assert torch.allclose(forward.weights, eager.weights, rtol=0, atol=1e-12)
        for ours, reference in zip(compiled.parameters(), eager_model.parameters()):
            assert torch.allclose(ours, reference, rtol=0, atol=1e-12)
