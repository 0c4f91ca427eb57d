"""metafair_opt._second_order: convolutions and batch norm with cheap second derivatives.

Each routed operation is checked against PyTorch's own (float64): values, first derivatives,
second derivatives (a vector-Hessian product through ``create_graph=True``), running statistics,
and ``gradgradcheck`` (finite differences of the second derivative, so the third order too).
Calls the mode does not cover must run PyTorch's operation unchanged. Then the alignment
wrapper's second-order meta-gradient on a convolutional model with BatchNorm, with the mode in
use, against a hand-written one with PyTorch's operations and against finite differences.
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import metafair_opt._second_order as second_order
from metafair_opt import GradientAlignmentWrapper, SampleReweighter
from metafair_opt._second_order import (
    has_second_order_ops,
    recomputed_batch_norm_gradients,
    second_order_ops,
)
from tests.helpers import rel_error

pytestmark = pytest.mark.usefixtures("float64_default")  # from tests/conftest.py

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def first_and_second_derivatives(module: nn.Module, x: Tensor, routed: bool
                                 ) -> tuple[list[Tensor], ...]:
    """Output, gradient of a non-linear loss in (x, parameters), and the derivative of that
    gradient along fixed random directions; with or without the mode."""
    inputs = [x, *module.parameters()]
    with second_order_ops(routed):
        out = module(x)
    loss = (out.sin() * torch.linspace(-1, 2, out.numel()).view_as(out)).sum()
    grads = torch.autograd.grad(loss, inputs, create_graph=True)
    g = torch.Generator().manual_seed(7)
    directions = [torch.randn(t.shape, generator=g) for t in grads]
    second = torch.autograd.grad(grads, inputs, grad_outputs=directions)
    return [out.detach()], [t.detach() for t in grads], list(second)


def assert_same_as_pytorch(module: nn.Module, x: Tensor, node: str) -> None:
    buffers = {n: b.clone() for n, b in module.named_buffers()}
    native = first_and_second_derivatives(module, x, routed=False)
    after_native = {n: b.clone() for n, b in module.named_buffers()}
    for n, b in module.named_buffers():
        b.copy_(buffers[n])
    with second_order_ops():
        assert type(module(x).grad_fn).__name__ == node  # the mode did route the call
    for n, b in module.named_buffers():
        b.copy_(buffers[n])
    routed = first_and_second_derivatives(module, x, routed=True)
    for ours, theirs in zip(routed, native):
        assert rel_error(ours, theirs) < 1e-12
    for n, b in module.named_buffers():  # running statistics moved as PyTorch moves them
        assert torch.allclose(b, after_native[n], rtol=0, atol=1e-14), n


@pytest.mark.parametrize("dims, options", [
    (2, dict(kernel_size=3, padding=1)),
    (2, dict(kernel_size=3, stride=2, padding=1, groups=2, bias=False)),
    (2, dict(kernel_size=(3, 2), stride=(2, 1), padding=(0, 1), dilation=(1, 2))),
    (2, dict(kernel_size=3, stride=2, padding=1, padding_mode="reflect")),
    (1, dict(kernel_size=3, stride=2)),
    (3, dict(kernel_size=2, stride=(1, 2, 1), padding=1)),
], ids=["plain", "strided-grouped-nobias", "rectangular-dilated", "reflect", "1d", "3d"])
def test_convolution_matches_pytorch_to_second_order(dims: int, options: dict) -> None:
    torch.manual_seed(0)
    conv = CONV[dims](4, 6, **options)
    x = torch.randn(3, 4, *([7] * dims), requires_grad=True)
    assert_same_as_pytorch(conv, x, "_ConvolutionBackward")


@pytest.mark.parametrize("dims, affine, track", [
    (2, True, True), (2, False, True), (2, True, False), (1, True, True), (3, True, True),
], ids=["2d", "no-affine", "no-running-stats", "1d", "3d"])
def test_batch_norm_matches_pytorch_to_second_order(dims: int, affine: bool,
                                                    track: bool) -> None:
    torch.manual_seed(0)
    norm = NORM[dims](3, affine=affine, track_running_stats=track)
    if affine:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_()
    x = (torch.randn(4, 3, *([5] * dims)) * 2 + 1).requires_grad_(True)
    assert_same_as_pytorch(norm, x, "_BatchNormBackward")


def test_batch_norm_1d_on_rows_matches_pytorch() -> None:
    """BatchNorm1d on (N, C): the statistics are over the rows alone."""
    torch.manual_seed(0)
    norm = nn.BatchNorm1d(5)
    assert_same_as_pytorch(norm, torch.randn(6, 5, requires_grad=True), "_BatchNormBackward")


@pytest.mark.parametrize("which", ["convolution", "batch_norm"])
def test_third_order_by_gradgradcheck(which: str) -> None:
    torch.manual_seed(0)
    if which == "convolution":
        module: nn.Module = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        x = torch.randn(2, 2, 5, 5, requires_grad=True)
    else:
        module = nn.BatchNorm2d(2)
        x = torch.randn(3, 2, 3, 3, requires_grad=True)
    names = [n for n, _ in module.named_parameters()]

    def routed(x: Tensor, *params: Tensor) -> Tensor:
        with second_order_ops():
            return functional_call(module, dict(zip(names, params)), (x,))

    params = [p.detach().clone().requires_grad_(True) for p in module.parameters()]
    assert torch.autograd.gradgradcheck(routed, (x, *params))


def test_only_the_gradient_of_the_weight_or_input_is_built_when_only_it_is_needed() -> None:
    """Frozen weights or an input without gradient: the Functions skip those terms."""
    torch.manual_seed(0)
    conv, norm = nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)
    conv.weight.requires_grad_(False)
    x = torch.randn(2, 2, 6, 6)  # no gradient for the input
    with second_order_ops():
        out = norm(conv(x))
    params = [conv.bias, norm.weight, norm.bias]
    grads = torch.autograd.grad(out.pow(3).sum(), params, create_graph=True)
    second = torch.autograd.grad(sum(g.sum() for g in grads), params)
    out_native = norm(conv(x))
    grads_native = torch.autograd.grad(out_native.pow(3).sum(), params, create_graph=True)
    second_native = torch.autograd.grad(sum(g.sum() for g in grads_native), params)
    assert rel_error([g.detach() for g in grads], [g.detach() for g in grads_native]) < 1e-12
    assert rel_error(list(second), list(second_native)) < 1e-12


@pytest.mark.parametrize("case", ["padding-same", "unbatched", "eval-batch-norm", "bfloat16",
                                  "autocast"])
def test_calls_the_mode_does_not_cover_run_pytorchs_operation(case: str) -> None:
    """The same graph node as without the mode (and the same values)."""
    torch.manual_seed(0)
    module: nn.Module = nn.Conv2d(2, 3, 3, padding="same" if case == "padding-same" else 0)
    x = torch.randn(2, 2, 5, 5, requires_grad=True)
    if case == "unbatched":
        x = torch.randn(2, 5, 5, requires_grad=True)
    elif case == "eval-batch-norm":
        module = nn.BatchNorm2d(2).eval()
    elif case == "bfloat16":
        module, x = module.bfloat16(), x.detach().bfloat16().requires_grad_()
    elif case == "autocast":
        module, x = module.float(), x.detach().float()
    with torch.autocast("cpu", enabled=case == "autocast"):
        native = module(x)
        with second_order_ops():
            out = module(x)
    assert type(out.grad_fn).__name__ == type(native.grad_fn).__name__
    assert not type(out.grad_fn).__name__.startswith("_")
    assert torch.equal(out, native)


def test_float32_is_routed() -> None:
    conv = nn.Conv2d(2, 3, 3).float()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float32)
    with second_order_ops():
        out = conv(x)
    assert type(out.grad_fn).__name__ == "_ConvolutionBackward"
    assert torch.allclose(out, conv(x), rtol=0, atol=1e-6)


def test_one_value_per_channel_raises_pytorchs_error() -> None:
    with second_order_ops(), pytest.raises(ValueError, match="more than 1 value per channel"):
        nn.BatchNorm2d(2)(torch.randn(1, 2, 1, 1))


def test_has_second_order_ops_finds_convolutions_and_batch_norm_at_any_depth() -> None:
    assert has_second_order_ops(nn.Sequential(nn.Sequential(nn.Conv2d(1, 1, 1))))
    assert has_second_order_ops(nn.Sequential(nn.Linear(2, 2), nn.SyncBatchNorm(2)))
    assert not has_second_order_ops(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)))


# ------------------------------------------------ batch norm input gradients computed again
class InPlaceDouble(torch.autograd.Function):
    """Identity forward; the backward doubles the incoming gradient in place."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return g.mul_(2)


class ConvNormStack(nn.Module):
    """conv, batch norm, tanh, conv, (optionally a layer doubling the gradient in place),
    batch norm: each batch norm's input gradient is saved by the convolution's backward before
    it, twice when the convolution's input needs a gradient too."""

    def __init__(self, double_in_place: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.norm1 = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.conv2, self.norm2 = nn.Conv2d(3, 3, 3, stride=2), nn.BatchNorm2d(3)
        self.double_in_place = double_in_place

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv2(self.norm1(self.conv1(x)).tanh())
        return self.norm2(InPlaceDouble.apply(h) if self.double_in_place else h)


@contextlib.contextmanager
def input_gradients_made(kept: Callable[[Tensor], Any]) -> Iterator[list[Any]]:
    """Collects ``kept(gx)`` for every batch norm input gradient a backward computes."""
    made: list[Any] = []
    original = second_order._BatchNormBackward.apply

    def spy(*args):
        outputs = original(*args)
        made.append(kept(outputs[0]))
        return outputs
    second_order._BatchNormBackward.apply = spy
    try:
        yield made
    finally:
        second_order._BatchNormBackward.apply = original


def gradient_and_its_derivatives(model: nn.Module, x: Tensor, routed: bool, recomputed: bool,
                                 passes: int = 1) -> tuple[list[Tensor], list[list[Tensor]],
                                                           list[weakref.ref]]:
    """The gradient of a non-linear loss in (x, parameters) built with ``create_graph``, the
    derivative of that gradient along fixed directions (``passes`` times over the same graph)
    and weak references to every batch norm input gradient the backward computed."""
    with input_gradients_made(weakref.ref) as made:
        inputs = [x, *model.parameters()]
        ops = second_order_ops(routed)
        with ops:
            out = model(x)
        loss = (out.sin() * torch.linspace(-1, 2, out.numel()).view_as(out)).sum()
        with recomputed_batch_norm_gradients(ops if recomputed else None):
            grads = torch.autograd.grad(loss, inputs, create_graph=True)
    g = torch.Generator().manual_seed(7)
    directions = [torch.randn(t.shape, generator=g) for t in grads]
    alive = [ref for ref in made if ref() is not None]  # after the backward, graph still held
    second = [list(torch.autograd.grad(grads, inputs, grad_outputs=directions,
                                       retain_graph=k + 1 < passes)) for k in range(passes)]
    return [t.detach() for t in grads], second, alive


@pytest.fixture
def recipe_computations(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How often an unpack asked a recipe for its value, and how often it was computed."""
    counts = {"asked": 0, "computed": 0}
    original = second_order._InputGradientRecipe.unpack

    def counted(self):
        counts["asked"] += 1
        counts["computed"] += self.value is None
        return original(self)
    monkeypatch.setattr(second_order._InputGradientRecipe, "unpack", counted)
    return counts


def test_recomputed_input_gradients_are_not_kept_and_give_the_same_derivatives(
        recipe_computations: dict[str, int]) -> None:
    """With the context the graph keeps none of the batch norms' input gradients, computes
    each once when differentiated (four unpacks: each convolution's input and weight gradient
    save it) and gives PyTorch's derivatives: to the bit against the routed graph without it,
    to rounding against PyTorch's own operations."""
    model, x = ConvNormStack(), torch.randn(4, 2, 6, 6, requires_grad=True)
    grads, [second], alive = gradient_and_its_derivatives(model, x, True, recomputed=True)
    assert alive == []
    assert recipe_computations == {"asked": 4, "computed": 2}
    grads_kept, [second_kept], alive_kept = gradient_and_its_derivatives(model, x, True, False)
    assert len(alive_kept) == 2  # without the context both are kept by the graph
    assert all(torch.equal(a, b) for a, b in zip(grads + second, grads_kept + second_kept))
    grads_native, [second_native], _ = gradient_and_its_derivatives(model, x, False, False)
    assert rel_error(grads + second, grads_native + second_native) < 1e-12


def test_recomputed_input_gradients_on_a_graph_differentiated_twice(
        recipe_computations: dict[str, int]) -> None:
    """retain_graph: the second pass computes each value once again and gets the same
    derivatives."""
    model, x = ConvNormStack(), torch.randn(4, 2, 6, 6, requires_grad=True)
    _, (first, again), _ = gradient_and_its_derivatives(model, x, True, True, passes=2)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert recipe_computations["computed"] == 4


def test_an_input_gradient_changed_in_place_is_saved_as_it_is(
        recipe_computations: dict[str, int]) -> None:
    """A layer between convolution and batch norm doubles the gradient in place: the second
    convolution saves the changed tensor (its version moved), not the recipe."""
    model = ConvNormStack(double_in_place=True)
    x = torch.randn(4, 2, 6, 6, requires_grad=True)
    grads, [second], _ = gradient_and_its_derivatives(model, x, True, recomputed=True)
    assert recipe_computations == {"asked": 2, "computed": 1}  # the first batch norm's only
    grads_native, [second_native], _ = gradient_and_its_derivatives(model, x, False, False)
    assert rel_error(grads + second, grads_native + second_native) < 1e-12


@pytest.mark.parametrize("model, shape, norms", [
    (ConvNormStack, (3, 2, 5, 5), 2),
    (lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, affine=False)), (3, 2, 4, 4),
     1),
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.BatchNorm1d(4)),
     (5, 3), 2),
], ids=["conv-norm-stack", "no-affine", "batch-norm-1d-on-rows"])
@pytest.mark.parametrize("recomputed", [False, True], ids=["kept", "recomputed"])
def test_third_order_of_a_loss_by_gradgradcheck(recomputed: bool, model, shape: tuple,
                                                 norms: int) -> None:
    """gradgradcheck of a loss's gradient built through the Functions, with and without the
    context: finite differences of its first and second derivatives (the loss's third, which
    differentiates batch norm's closed-form second derivative; PyTorch's own batch norm raises
    there). With the context these unpack the recomputed values."""
    torch.manual_seed(0)
    model = model()
    names = [n for n, _ in model.named_parameters()]
    x = torch.randn(*shape, requires_grad=True)

    def gradient(x: Tensor, *params: Tensor) -> tuple[Tensor, ...]:
        ops = second_order_ops()
        with ops:
            out = functional_call(model, dict(zip(names, params)), (x,))
        assert ops.batch_norms == norms  # every batch norm was routed
        with recomputed_batch_norm_gradients(ops if recomputed else None):
            return torch.autograd.grad(out.sin().sum(), (x, *params), create_graph=True)

    params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    assert torch.autograd.gradcheck(gradient, (x, *params), fast_mode=True)
    assert torch.autograd.gradgradcheck(gradient, (x, *params), fast_mode=True)


def test_other_saved_tensor_hooks_are_left_to_decide() -> None:
    """Under save_on_cpu (hooks of the user's) the context does nothing, so theirs see every
    saved tensor; where hooks are disabled it does nothing rather than raise."""
    model, x = ConvNormStack(), torch.randn(4, 2, 6, 6, requires_grad=True)
    grads, [second], _ = gradient_and_its_derivatives(model, x, True, recomputed=True)
    with torch.autograd.graph.save_on_cpu():
        grads_cpu, [second_cpu], alive = gradient_and_its_derivatives(model, x, True, True)
    assert len(alive) == 2  # save_on_cpu keeps a CPU tensor itself
    with torch.autograd.graph.disable_saved_tensors_hooks("no hooks here"):
        grads_off, [second_off], alive_off = gradient_and_its_derivatives(model, x, True, True)
    assert len(alive_off) == 2
    for other in (grads_cpu + second_cpu, grads_off + second_off):
        assert all(torch.equal(a, b) for a, b in zip(grads + second, other))


def test_the_context_leaves_no_reference_cycle() -> None:
    """A node that saves its own output (the sigmoid in binary cross-entropy's backward), in a
    graph differentiated with retain_graph: saved through the hooks as it is, it would hold
    itself, and through its inputs the whole forward graph and its activations, for good; the
    hooks save it detached."""
    torch.manual_seed(0)
    model, x = ConvNormStack(), torch.randn(4, 2, 6, 6)
    ops = second_order_ops()
    with ops:
        hidden = model.norm1(model.conv1(x)).tanh()
        out = model.norm2(model.conv2(hidden))
    loss = F.binary_cross_entropy_with_logits(out.mean((1, 2, 3)), torch.ones(4))
    with recomputed_batch_norm_gradients(ops):
        grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    torch.autograd.grad(grads[0].sum(), model.conv1.weight, retain_graph=True)
    kept = weakref.ref(hidden)  # saved by the forward graph (tanh's output, conv2's input)
    del hidden, out, loss, grads
    gc.collect()
    assert kept() is None


@pytest.mark.parametrize("changed", ["backward-saved", "forward-saved", "recipe-input"])
def test_a_saved_tensor_changed_in_place_raises_autograds_error(changed: str) -> None:
    """Autograd skips its version check for tensors saved through hooks: the hooks make it.
    Changed in place: the gradient at tanh's output (saved only by the support backward's
    graph, through the hooks), a weight (saved by the forward's graph too), and the gradient
    at the first batch norm's output (saved by its backward and by its recipe)."""
    torch.manual_seed(0)
    model, x = ConvNormStack(), torch.randn(4, 2, 6, 6)
    received: dict[str, Tensor] = {}
    ops = second_order_ops()
    with ops:
        normed = model.norm1(model.conv1(x))
        hidden = normed.tanh()
        out = model.norm2(model.conv2(hidden))
    normed.register_hook(lambda g: received.setdefault("recipe-input", g))
    hidden.register_hook(lambda g: received.setdefault("backward-saved", g))
    with recomputed_batch_norm_gradients(ops):
        grads = torch.autograd.grad(out.pow(3).sum(), list(model.parameters()),
                                    create_graph=True)
    received["forward-saved"] = model.conv2.weight
    with torch.no_grad():
        received[changed].mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(sum(g.sum() for g in grads), list(model.parameters()))


def test_a_recipe_checks_its_inputs_before_computing() -> None:
    """In the wrappers the batch norm node's own saved tensors (the same ones) raise first; the
    recipe checks them itself for a pass that would not unpack that node."""
    g, x = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    mean, invstd = x.mean((0, 2, 3)), (x.var((0, 2, 3), correction=0) + 1e-5).rsqrt()
    gx = torch.ops.aten.native_batch_norm_backward(
        g, x, None, None, None, mean, invstd, True, 1e-5, [True, False, False])[0]
    recipe = second_order._InputGradientRecipe(gx, (g, x, None, mean, invstd), 1e-5,
                                               [True, False, False])
    assert recipe.save(gx) is recipe
    assert torch.equal(recipe.unpack(), gx)
    recipe.save(gx)
    x.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        recipe.unpack()


def test_recipes_are_made_only_under_the_context_and_only_for_routed_batch_norm() -> None:
    """Without the context no input gradient carries a recipe; a forward that routed no batch
    norm (eval mode) gets a no-op context."""
    model, x = ConvNormStack(), torch.randn(4, 2, 6, 6, requires_grad=True)
    with input_gradients_made(lambda gx: gx) as made:
        with second_order_ops():
            out = model(x)
        torch.autograd.grad(out.sin().sum(), x, create_graph=True)
    assert len(made) == 2 and not any(hasattr(t, second_order.RECIPE) for t in made)
    model.eval()
    ops = second_order_ops()
    with ops:
        model(x)
    assert ops.batch_norms == 0
    assert type(recomputed_batch_norm_gradients(ops)).__name__ == "nullcontext"
    assert type(recomputed_batch_norm_gradients(None)).__name__ == "nullcontext"


# ------------------------------------------------------------------------ in the wrappers
@pytest.fixture
def routed(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How many convolution and batch norm calls the mode routed (counted while the test runs)."""
    counts = {"convolution": 0, "batch_norm": 0}
    for name, key in (("_Convolution", "convolution"), ("_BatchNorm", "batch_norm")):
        function = getattr(second_order, name)
        original = function.apply

        def counted(*args, _original=original, _key=key):
            counts[_key] += 1
            return _original(*args)
        monkeypatch.setattr(function, "apply", counted)
    return counts


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(),
                         nn.Conv2d(3, 3, 3, stride=2), nn.BatchNorm2d(3), nn.Tanh(),
                         nn.Flatten(), nn.Linear(12, 1))


def small_batches(seed: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(5, 2, 5, 5, generator=g), (torch.rand(5, generator=g) > 0.5).double(),
            torch.randn(6, 2, 5, 5, generator=g), (torch.rand(6, generator=g) > 0.5).double())


def bce(output: Tensor, target: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(output.squeeze(-1), target)


def query_loss_after_inner(model: nn.Module, params: list[Tensor], batches, lr: float,
                           steps: int, create_graph: bool) -> Tensor:
    """With PyTorch's own operations: the inner SGD steps on X_s (buffers on a copy), then
    the query loss at the adapted parameters (on another copy)."""
    xs, ys, xq, yq = batches
    names = [n for n, _ in model.named_parameters()]
    scratch = {n: b.clone() for n, b in model.named_buffers()}
    for _ in range(steps):
        out = functional_call(model, {**dict(zip(names, params)), **scratch}, (xs,))
        grads = torch.autograd.grad(bce(out, ys), params, create_graph=create_graph)
        params = [p - lr * g for p, g in zip(params, grads)]
    committed = {n: b.clone() for n, b in model.named_buffers()}
    return bce(functional_call(model, {**dict(zip(names, params)), **committed}, (xq,)), yq)


@pytest.mark.parametrize("recompute", [False, True], ids=["kept", "recomputed"])
@pytest.mark.parametrize("inner_steps", [1, 2])
def test_wrapper_meta_gradient_on_a_cnn_matches_pytorchs_operations(
        inner_steps: int, recompute: bool, routed: dict[str, int],
        recipe_computations: dict[str, int]) -> None:
    batches, lr = small_batches(), 0.4
    model = small_cnn()
    params0 = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    expected = torch.autograd.grad(
        query_loss_after_inner(model, params0, batches, lr, inner_steps, create_graph=True),
        params0)

    xs, ys, xq, yq = batches
    wrapper = GradientAlignmentWrapper(model, torch.optim.SGD(model.parameters(), lr=0.0),
                                       loss_fn=bce, inner_lr=lr, inner_steps=inner_steps,
                                       recompute_support=recompute)
    wrapper.step(support=(xs, ys), query=(xq, yq))
    assert routed == {"convolution": 2 * inner_steps, "batch_norm": 2 * inner_steps}
    # Each inner step's graph kept no batch norm input gradient: each was computed again.
    assert recipe_computations["computed"] == 2 * inner_steps
    assert rel_error([p.grad for p in model.parameters()], list(expected)) < 1e-10

    # Finite differences of the query loss after the inner steps (PyTorch's operations).
    eps, numeric = 1e-6, []
    for k, tensor in enumerate(params0):
        grad = torch.zeros_like(tensor)
        for idx in range(tensor.numel()):
            values = []
            for sign in (1.0, -1.0):
                shifted = [t.detach().clone().requires_grad_(True) for t in params0]
                shifted[k].data.view(-1)[idx] += sign * eps
                values.append(query_loss_after_inner(model, shifted, batches, lr, inner_steps,
                                                     create_graph=False).item())
            grad.view(-1)[idx] = (values[0] - values[1]) / (2 * eps)
        numeric.append(grad)
    assert rel_error([p.grad for p in model.parameters()], numeric) < 1e-6


def test_first_order_and_model_without_such_modules_do_not_use_the_mode(
        monkeypatch: pytest.MonkeyPatch) -> None:
    entered = []
    original = second_order._SecondOrderOps.__enter__

    def spy(self):
        entered.append(True)
        return original(self)
    monkeypatch.setattr(second_order._SecondOrderOps, "__enter__", spy)
    xs, ys, xq, yq = small_batches()
    model = small_cnn()
    GradientAlignmentWrapper(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=bce,
                             first_order=True).step(support=(xs, ys), query=(xq, yq))
    assert not entered
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(50, 1))
    GradientAlignmentWrapper(mlp, torch.optim.SGD(mlp.parameters(), lr=0.1),
                             loss_fn=bce).step(support=(xs, ys), query=(xq, yq))
    assert not entered
    GradientAlignmentWrapper(model, torch.optim.SGD(model.parameters(), lr=0.1),
                             loss_fn=bce).step(support=(xs, ys), query=(xq, yq))
    assert entered


def test_reweighter_reverse_mode_on_a_cnn_matches_the_forward_mode(
        routed: dict[str, int], recipe_computations: dict[str, int]) -> None:
    """The reverse mode's training forward goes through the mode (its gradient is
    differentiated again); the forward mode (a jvp, which takes none of this module's Functions;
    tests/test_forward_replay.py checks it against PyTorch's own jvp) must give the same steps.
    Two steps, so the second starts from what the first changed (weights, running stats)."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 2, 5, 5, generator=g), torch.randint(0, 2, (8,), generator=g)
    val = (torch.randn(6, 2, 5, 5, generator=g), torch.randint(0, 2, (6,), generator=g),
           torch.arange(6) % 2)
    idx = torch.tensor([4, 0, 9, 2, 7, 1, 5, 3])
    outcomes = {}
    for mode in ("reverse", "forward"):
        model = nn.Sequential(*list(small_cnn(seed=4))[:-1], nn.Linear(12, 2))
        rw = SampleReweighter(model, torch.optim.SGD(model.parameters(), lr=0.1),
                              num_samples=10, loss_fn=F.cross_entropy, weight_lr=2.0,
                              lookahead_lr=0.5, weight_grad_mode=mode)
        for _ in range(2):
            rw.zero_grad()
            rw.step(x, y, idx, val=val)
        outcomes[mode] = (rw.weights.clone(), [t.clone() for t in model.state_dict().values()])
        if mode == "reverse":
            assert routed == {"convolution": 4, "batch_norm": 4}
            assert recipe_computations["computed"] == 4  # each look-ahead graph's, again
    (w_rev, s_rev), (w_fwd, s_fwd) = outcomes["reverse"], outcomes["forward"]
    assert w_rev.abs().max() > 1e-3  # the weights moved, so the comparison means something
    assert torch.allclose(w_rev, w_fwd, rtol=0, atol=1e-12)
    for a, b in zip(s_rev, s_fwd):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    assert routed == {"convolution": 4, "batch_norm": 4}  # none in the forward mode


def test_our_modes_stay_out_of_what_torch_compile_traces() -> None:
    """While torch.compile traces code called under one of our modes, the mode's intercept
    is not called (the compiled code may still pass through it when it runs)."""
    import torch._dynamo.testing

    from metafair_opt._forward_replay import _Recording, _Replaying
    from metafair_opt._recomputed_activations import _Noting

    for mode in (second_order._SecondOrderOps, _Recording, _Replaying, _Noting):
        assert mode.__torch_function__ is second_order.InterceptingMode.__torch_function__
    while_compiling: list[bool] = []

    class Seeing(second_order.InterceptingMode):
        def intercept(self, func: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
            while_compiling.append(torch.compiler.is_compiling())
            return func(*args, **kwargs)

    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(lambda x: torch.relu(x) + 1, backend=counter)
    x = torch.randn(3)
    expected = torch.relu(x) + 1
    with Seeing():
        got = compiled(x)
    assert torch.equal(got, expected)
    assert counter.frame_count == 1
    assert while_compiling and True not in while_compiling
