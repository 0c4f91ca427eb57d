"""metafair_opt._recomputed_activations: batch norm, in-place ReLU and residual-sum outputs
saved as recipes and computed again when the graph needs them.

Every check compares with the same forward run without the context: gradients to the bit (the
values computed again are the very ones), which tensors the graph keeps (weak references), how
often each recipe is computed, and the errors autograd raises for in-place changes. Then the
reweighter's forward-mode step with and without it.
"""

from __future__ import annotations

import copy
import gc
import weakref
from collections import Counter
from contextlib import nullcontext
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

import metafair_opt._recomputed_activations as activations
import metafair_opt.reweighting as reweighting
from metafair_opt import SampleReweighter
from metafair_opt._recomputed_activations import RecomputedActivations, has_batch_norm
from metafair_opt._saved_recipes import RECIPE
from tests.helpers import spy_on_replay_takes, two_reweighting_steps


class Block(nn.Module):
    """timm's basic block: conv, BN, in-place ReLU, conv, BN, += shortcut, in-place ReLU."""

    def __init__(self, channels: int, out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out, out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.act2 = nn.ReLU(inplace=True)
        self.down = (nn.Sequential(nn.Conv2d(channels, out, 1, stride=stride, bias=False),
                                   nn.BatchNorm2d(out)) if stride > 1 else None)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.down is None else self.down(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += shortcut
        return self.act2(out)


def resnet(seed: int = 0, classes: int = 3) -> nn.Sequential:
    """A stem and two stages (the second downsamples): every kind of noted output."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4),
                         nn.ReLU(inplace=True), Block(4, 4), Block(4, 6, stride=2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, classes))


def batch(seed: int = 1, rows: int = 5) -> Tensor:
    return torch.randn(rows, 2, 8, 8, generator=torch.Generator().manual_seed(seed))


def relu_outputs(model: nn.Module) -> tuple[list[weakref.ref[Tensor]], Any]:
    """Weak references to each ReLU module's output, filled by the next forward; and the hooks'
    handles."""
    refs: list[weakref.ref[Tensor]] = []
    handles = [m.register_forward_hook(lambda m, i, o: refs.append(weakref.ref(o)))
               for m in model.modules() if isinstance(m, nn.ReLU)]
    return refs, handles


def gradients(model: nn.Module, x: Tensor, context: Any, passes: int = 1,
              between: Any = None, after_forward: Any = None) -> list[list[Tensor]]:
    """Each pass's gradient of a fixed function of ``model(x)`` with respect to the parameters
    and the input, the forward run inside ``context`` on a copy of the model (each call sees the
    same buffers); ``after_forward()`` runs while the graph is alive, ``between()`` after the
    first pass."""
    x = x.clone().requires_grad_(True)
    model = copy.deepcopy(model)
    with context:
        out = model(x)
    if after_forward is not None:
        gc.collect()
        after_forward()
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    inputs = [x, *model.parameters()]
    result = []
    for k in range(passes):
        result.append(list(torch.autograd.grad((out * weights).sum(), inputs,
                                               retain_graph=k + 1 < passes)))
        if between is not None and k == 0:
            between()
    return result


def assert_bitwise(got: list[list[Tensor]], expected: list[list[Tensor]]) -> None:
    for got_pass, expected_pass in zip(got, expected, strict=True):
        for a, b in zip(got_pass, expected_pass, strict=True):
            assert torch.equal(a, b)
    assert max(g.abs().max() for g in expected[0]) > 1e-3  # gradients that mean something


@pytest.fixture
def computed(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """How many values each kind of recipe computed."""
    counts: Counter = Counter()
    for kind in (activations._BatchNormOutput, activations._Relu, activations._Sum):
        original = kind.evaluate

        def counted(self, original=original, name=kind.__name__):
            counts[name] += 1
            return original(self)
        monkeypatch.setattr(kind, "evaluate", counted)
    return counts


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_noted_outputs_are_not_kept_and_give_the_same_gradients(
        dtype: torch.dtype, computed: Counter) -> None:
    """The graph keeps none of the ReLU outputs (five: the stem's, and two per block), and
    computes each once per pass: the gradients of two passes are the bits of the same graph
    without the context."""
    model = resnet().to(dtype)
    x = batch().to(dtype)
    refs, handles = relu_outputs(model)
    alive: list[list[bool]] = []

    def note_alive() -> None:
        alive.append([ref() is not None for ref in refs[-5:]])
    got = gradients(model, x, RecomputedActivations().forward(), passes=2,
                    after_forward=note_alive)
    # Per pass: five ReLUs, two sums (one per block) and the six batch norms under them;
    # nothing computed twice within a pass.
    assert computed == Counter({"_Relu": 10, "_Sum": 4, "_BatchNormOutput": 12})
    expected = gradients(model, x, nullcontext(), passes=2, after_forward=note_alive)
    for handle in handles:
        handle.remove()
    # Without it the graph keeps the four that a convolution reads (autograd keeps an output
    # that only its own node saves as data, not as the object: no reference tells).
    assert len(refs) == 10 and alive == [[False] * 5, [True] * 4 + [False]]
    assert_bitwise(got, expected)


def test_kept_values_serve_until_released(computed: Counter) -> None:
    """keep=True: the first pass takes the tensors themselves (nothing computed), which the
    graph holds until release(); the pass after computes each once."""
    model, x = resnet(), batch()
    kept = RecomputedActivations(keep=True)
    outputs: list[int] = []
    handles = [m.register_forward_hook(lambda m, i, o: outputs.append(o.data_ptr()))
               for m in model.modules() if isinstance(m, nn.ReLU)]
    held: list[int] = []

    def release() -> None:
        assert computed == Counter()  # the first pass used the kept tensors
        held.extend(recipe.value.data_ptr() for recipe in kept._kept)
        kept.release()
        assert not kept._kept
    got = gradients(model, x, kept.forward(), passes=2, between=release)
    for handle in handles:
        handle.remove()
    assert sorted(held) == sorted(outputs) and len(outputs) == 5  # the ReLU outputs themselves
    assert computed == Counter({"_Relu": 5, "_Sum": 2, "_BatchNormOutput": 6})
    assert_bitwise(got, gradients(model, x, nullcontext(), passes=2))


def test_saved_inputs_stay_the_very_tensor_objects() -> None:
    """A saved argument is kept as autograd keeps it: the same object (the forward replay's
    record finds convolution outputs by weak references), here a convolution output that only
    the batch norm saves."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Tanh())
    refs: list[weakref.ref[Tensor]] = []
    model[0].register_forward_hook(lambda m, i, o: refs.append(weakref.ref(o)))
    with RecomputedActivations().forward():
        out = model(batch())
    gc.collect()
    assert refs[0]() is not None
    del out
    gc.collect()
    assert refs[0]() is None  # and nothing else holds it


def test_what_is_not_noted() -> None:
    """Out-of-place ReLU (it saves its output before the mode could note it), eval-mode batch
    norm, a sum with a tensor that is not noted, and a noted tensor changed in place since."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    weight, bias = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)

    def norm(training: bool = True) -> Tensor:
        return F.batch_norm(x, torch.zeros(3), torch.ones(3), weight, bias, training)
    noted = activations._noted
    with RecomputedActivations().forward():
        assert noted(norm()) and not noted(norm(training=False))
        assert not noted(F.relu(norm())) and not noted(torch.relu(norm()))
        assert noted(F.relu(norm(), inplace=True)) and noted(norm().relu_())
        assert noted(norm() + norm()) and noted(torch.add(norm(), norm()))
        in_place_sum = norm()
        in_place_sum += norm()
        assert isinstance(noted(in_place_sum), activations._Sum)
        assert not noted(norm() + x) and not noted(norm() + 1.0)
        assert not noted(torch.add(norm(), norm(), alpha=2))
        changed = norm().mul_(2)
        assert hasattr(changed, RECIPE) and not noted(changed)  # no longer its value
        assert not noted(changed.relu_())
    with torch.autograd.graph.save_on_cpu():
        assert isinstance(RecomputedActivations().forward(), nullcontext)
    assert isinstance(RecomputedActivations(enabled=False).forward(), nullcontext)
    assert has_batch_norm(resnet()) and not has_batch_norm(nn.Linear(2, 2))


def test_a_noted_tensor_changed_in_place_is_saved_as_it_is() -> None:
    """A batch norm output scaled in place before its ReLU: the ReLU's output is then not noted
    and is saved itself; the gradients are still those without the context."""
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)
            self.head = nn.Conv2d(3, 2, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.bn(self.conv(x)).mul_(2).relu_())
    torch.manual_seed(0)
    model, x = Scaled(), batch()
    assert_bitwise(gradients(model, x, RecomputedActivations().forward()),
                   gradients(model, x, nullcontext()))


def test_inputs_changed_in_place_raise_autograds_error() -> None:
    """A batch norm's input changed in place before the graph is differentiated raises the
    error autograd raises without the context; so does a recipe computing from it directly."""
    torch.manual_seed(0)
    conv, bn, head = nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Conv2d(3, 2, 3)
    for context in (nullcontext(), RecomputedActivations().forward()):
        with context:
            hidden = conv(batch())
            normed = bn(hidden).relu_()
            out = head(normed)
            recipe = activations._noted(normed)
        with torch.no_grad():
            hidden.add_(1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            torch.autograd.grad(out.sum(), list(conv.parameters()))
    assert isinstance(recipe, activations._Relu)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        recipe.evaluate()


def test_only_a_graph_the_hooks_save_is_noted() -> None:
    """Outputs of a frozen part, or under no_grad, or inside checkpoint, are not noted: their
    recipes would keep batch norm inputs that nothing else keeps (here the frozen blocks'
    convolution outputs, all freed without the context too)."""
    torch.manual_seed(0)
    frozen = nn.Sequential(Block(2, 6, stride=2), Block(6, 6)).requires_grad_(False)
    head = nn.Conv2d(6, 3, 3)
    refs: list[weakref.ref[Tensor]] = []
    for conv in frozen.modules():
        if isinstance(conv, nn.Conv2d):
            conv.register_forward_hook(lambda m, i, o: refs.append(weakref.ref(o)))
    with RecomputedActivations().forward():
        out = head(frozen(batch()))
        with torch.no_grad():
            assert activations._noted(frozen(batch())) is None
        checkpointed = torch.utils.checkpoint.checkpoint(resnet(), batch(), use_reentrant=False)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):  # as there
            assert activations._noted(resnet()[:2](batch())) is None
        assert activations._noted(resnet()[:2](batch())) is not None
    gc.collect()
    assert len(refs) == 2 * 5 and all(ref() is None for ref in refs)
    assert out.requires_grad and checkpointed.requires_grad


def test_tags_are_removed_when_the_forward_ends() -> None:
    """A noted tensor that outlives the forward carries no recipe (nor the inputs it keeps)."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(2)
    with RecomputedActivations().forward():
        y = bn(batch()).relu_()
        assert isinstance(activations._noted(y), activations._Relu)
    assert not hasattr(y, RECIPE)


def test_inference_tensors_pass_through() -> None:
    with torch.inference_mode():
        x = torch.randn(2, 3)
    with RecomputedActivations().forward():
        assert torch.equal(x * 2, x + x)


class Raising(TorchFunctionMode):
    """Raises on in-place ReLU (below the noting mode: as a failing kernel would)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.relu_, Tensor.relu_):
            raise RuntimeError("relu_ failed")
        return func(*args, **(kwargs or {}))


def test_a_failed_relu_leaves_the_batch_norms_recipe() -> None:
    """The ReLU's recipe, set before the call, is taken back when the call raises: the tensor
    keeps the batch norm's, which a later in-place change then outdates."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(2)
    with Raising(), RecomputedActivations().forward():
        y = bn(batch())
        with pytest.raises(RuntimeError, match="relu_ failed"):
            y.relu_()
        assert isinstance(activations._noted(y), activations._BatchNormOutput)
        y.mul_(-1)
        assert activations._noted(y) is None


class Counting(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Any] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append(func)
        return func(*args, **(kwargs or {}))


def test_a_mode_active_in_the_backward_does_not_see_the_recomputation() -> None:
    """The values are computed as in the forward, not through a mode the backward runs under
    (ours would route batch norm to another kernel)."""
    model = resnet()
    with RecomputedActivations().forward():
        loss = model(batch()).sum()
    counting, ones, params = Counting(), torch.ones_like(loss), tuple(model.parameters())
    with counting:  # the engine itself: torch.autograd.grad would run without the mode
        torch.autograd.Variable._execution_engine.run_backward(
            (loss,), (ones,), False, False, params, False, False)
    assert counting.calls  # the mode was active in the backward (it saw attribute reads)
    recomputing = {torch.batch_norm, F.batch_norm, torch.relu, Tensor.relu_, Tensor.add_,
                   torch.add}
    assert not recomputing & set(counting.calls)


@pytest.mark.parametrize("layout", ["a += a", "channels_last"])
def test_other_shapes_of_the_same_graph_give_the_same_gradients(layout: str) -> None:
    """A sum of a tensor with itself; a channels_last model and input (a sum of operands with
    other strides is not noted: its value computed again would take one operand's)."""
    if layout == "a += a":
        class Doubled(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.bn, self.head = nn.BatchNorm2d(2), nn.Conv2d(2, 2, 3)

            def forward(self, x: Tensor) -> Tensor:
                y = self.bn(x)
                y += y
                return self.head(y.relu_())
        torch.manual_seed(0)
        model, x = Doubled(), batch()
    else:
        model = resnet().to(memory_format=torch.channels_last)
        x = batch().contiguous(memory_format=torch.channels_last)
    assert_bitwise(gradients(model, x, RecomputedActivations().forward()),
                   gradients(model, x, nullcontext()))
    mixed = torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    with RecomputedActivations().forward():
        norm = nn.BatchNorm2d(3)
        assert activations._noted(norm(mixed) + norm(mixed.contiguous())) is None


# ------------------------------------------------------------------------ in the reweighter
def reweighter_run(monkeypatch: pytest.MonkeyPatch, recompute: bool, **options) -> tuple:
    """Two forward-mode reweighting steps on the ResNet; ``recompute=False`` turns the recipes
    off. Returns the weights, the model's state and how many convolution outputs the forward
    replay took from the training forward."""
    with monkeypatch.context() as patch:
        taken = spy_on_replay_takes(patch)
        if not recompute:
            patch.setattr(reweighting, "RecomputedActivations",
                          lambda enabled=True, keep=False: RecomputedActivations(False, keep))
        weights, state = two_reweighting_steps(resnet(seed=4), lambda seed, rows: batch(seed, rows),
                                               weight_grad_mode="forward", **options)
    return weights, state, sum(taken)


@pytest.mark.parametrize("options", [{}, {"recompute_forward": True}],
                         ids=["kept", "recompute_forward"])
def test_reweighter_forward_mode_is_the_same_with_recomputed_activations(
        monkeypatch: pytest.MonkeyPatch, computed: Counter, options: dict) -> None:
    """The same weights and model to the bit. Per step the training graph's final pass and the
    validation graph's pass compute the five ReLU outputs each (recompute_forward: the
    validation graph only; the training forward's graph is freed after its first pass)."""
    w_got, state_got, taken = reweighter_run(monkeypatch, recompute=True, **options)
    assert computed["_Relu"] == 2 * (5 if options else 10)
    # The forward replay still finds the six convolution outputs a step (none when the
    # training forward's graph is freed).
    assert taken == (0 if options else 12)
    w_ref, state_ref, _ = reweighter_run(monkeypatch, recompute=False, **options)
    assert computed["_Relu"] == 2 * (5 if options else 10)  # none without the recipes
    assert w_ref.abs().max() > 1e-3  # the weights moved, so the comparison means something
    assert torch.equal(w_got, w_ref)
    for a, b in zip(state_got, state_ref, strict=True):
        assert torch.equal(a, b)


def four_stage_resnet() -> nn.Sequential:
    """torchvision's basic blocks in four stages (with the two-stage :func:`resnet` the
    compiled model's gradients came out right even without the fix tested below)."""
    resnet = pytest.importorskip("torchvision.models.resnet")

    torch.manual_seed(0)
    blocks, channels = [], 4
    for out, stride in ((4, 1), (8, 2), (8, 1), (16, 2)):
        down = (None if stride == 1 and channels == out else nn.Sequential(
            nn.Conv2d(channels, out, 1, stride, bias=False), nn.BatchNorm2d(out)))
        blocks.append(resnet.BasicBlock(channels, out, stride, down))
        channels = out
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4),
                         nn.ReLU(inplace=True), *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 3))


@pytest.mark.usefixtures("fresh_torch_compile")
def test_a_compiled_model_steps_as_the_eager_one() -> None:
    """torch.compile traces the model without our modes (``InterceptingMode``): with them in
    the trace, this model's final gradients were wrong (on ResNet-18 zero for some
    parameters). Compiled with aot_eager (the same tracing, no code generation); donated
    buffers off, as torch's error asks for a compiled backward with ``retain_graph``, which the
    forward mode uses."""
    import torch._dynamo.testing
    import torch._functorch.config

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, 16, 16, generator=g), torch.randint(0, 3, (6,), generator=g)
    val = (torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 3, (4,), generator=g),
           torch.arange(4) % 2)

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")

    def step(compiled: bool) -> tuple[Tensor, list[Tensor]]:
        model = four_stage_resnet()
        rw = SampleReweighter(torch.compile(model, backend=counter) if compiled else model,
                              torch.optim.SGD(model.parameters(), lr=0.0), 6, F.cross_entropy,
                              weight_grad_mode="forward", weight_optimizer="sgd", weight_lr=1.0,
                              lookahead_lr=0.1)
        rw.step(x, y, torch.arange(6), val=val)
        return rw.weights, [p.grad for p in model.parameters()]

    with torch._functorch.config.patch(donated_buffer=False):
        (w_eager, g_eager), (w_compiled, g_compiled) = step(False), step(True)
    assert counter.frame_count >= 1  # compiled, not run eagerly after a fallback
    assert w_eager.abs().max() > 1e-4  # the weights moved
    torch.testing.assert_close(w_compiled, w_eager, rtol=1e-5, atol=1e-9)
    for got, expected in zip(g_compiled, g_eager, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
