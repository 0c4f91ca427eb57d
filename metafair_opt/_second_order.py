"""Convolution and training-mode batch norm with cheap second derivatives.

A second-order meta-gradient differentiates the support gradient once more. For convolutions
and batch norm PyTorch's own second derivative is slow on the CPU: the convolution's weight
gradient is differentiated by ``_convolution_double_backward``, which computes its
weight-gradient term as a convolution whose kernel is the whole output feature map (on ResNet-18's
first stage, 24 rows at 32x32, 26 ms against the layer's forward convolution's 9.6 ms), and batch
norm's second derivative is a composite of about 34 full-size products per layer. On the
benchmark's ResNet-18 (24 support rows, 2 CPU cores, torch 2.15) the two made the double
backward cost 2.8x the support forward and backward it differentiates.

:func:`second_order_ops` is a ``TorchFunctionMode`` that, while a forward runs, routes
``conv1d``/``conv2d``/``conv3d`` and training-mode ``batch_norm`` to autograd Functions computing
the same values and first derivatives with PyTorch's own kernels, whose backward, when a graph
is being built (``create_graph=True``), is written with operations that have efficient
derivatives: the input gradient as a transposed convolution, the weight gradient as a Function
whose derivative is one forward and one transposed convolution, and batch norm's second
derivative in closed form (a dozen full-size operations). Values, first and second derivatives
are those of PyTorch's operations (tests compare them to rounding in float64); the third, which
PyTorch's own batch norm refuses, is checked against finite differences (``gradgradcheck``).

:func:`recomputed_batch_norm_gradients` is a context for the ``create_graph=True`` backward of
such a forward: batch norm's input gradient, which the convolution before it saves for the second
derivative (as the transposed convolution's input and the weight gradient's ``grad_output``), is
saved as a recipe instead (``g``, ``x`` and statistics its own backward's graph keeps anyway) and
computed again when the graph is differentiated (once per pass that unpacks every save). On the
benchmark's ResNet-18 that is half of what the support backward's graph saves, and the alignment
step's peak of live tensors fell from 426 to 370 MB, for about 1 % more time. Every other tensor
that backward saves goes through the same saved-tensor hooks, detached (as autograd's own
saving does; saved as it is, a node saving its own output would hold itself) and with
autograd's check that it was not changed in place, which autograd skips for hooked tensors.

Calls the Functions do not cover run as they are: ``padding="same"``/``"valid"``, unbatched
inputs, dtypes other than float32 and float64, autocast, batch norm in eval mode, and calls in
code that ``torch.compile`` traces (see :class:`InterceptingMode`; torch 2.15 cannot
differentiate a compiled model twice anyway). The routing applies on every device; its speed
has been measured on the CPU only.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from metafair_opt._saved_recipes import (
    RECIPE,
    Recipe,
    recipes_possible,
    recipes_wanted,
    saving_recipes,
)

__all__ = ["has_second_order_ops", "recomputed_batch_norm_gradients", "second_order_ops"]

_aten = torch.ops.aten
_CONVOLUTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_CONVOLUTION_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONVOLUTION_DEFAULTS = (None, None, None, 1, 0, 1, 1)
_BATCH_NORM_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training",
                    "momentum", "eps")
_BATCH_NORM_DEFAULTS = (None, None, None, None, None, False, 0.1, 1e-5)
_FLOATS = (torch.float32, torch.float64)


def has_second_order_ops(model: nn.Module) -> bool:
    """Whether ``model`` holds a convolution or batch norm module that :func:`second_order_ops`
    would route (without one the mode would only add its per-call overhead)."""
    return any(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.modules.batchnorm._BatchNorm))
               for m in model.modules())


def second_order_ops(enabled: bool = True) -> Any:
    """A context for a forward whose gradient will be differentiated again (see the module's
    docstring); a no-op context when ``enabled`` is False."""
    return _SecondOrderOps() if enabled else nullcontext()


# ------------------------------------------------------------------------------ convolution
def _output_padding(x: Tensor, g: Tensor, kernel: Sequence[int], stride: list[int],
                    padding: list[int], dilation: list[int]) -> list[int]:
    """The transposed convolution's ``output_padding`` that maps ``g`` back to ``x``'s size."""
    return [x.shape[2 + i] - ((g.shape[2 + i] - 1) * stride[i] - 2 * padding[i]
                              + dilation[i] * (kernel[i] - 1) + 1) for i in range(len(stride))]


def _input_gradient(g: Tensor, weight: Tensor, x: Tensor, stride: list[int], padding: list[int],
                    dilation: list[int], groups: int) -> Tensor:
    """The gradient with respect to the convolution's input: a transposed convolution."""
    return _aten.convolution(g, weight, None, stride, padding, dilation, True,
                             _output_padding(x, g, weight.shape[2:], stride, padding, dilation),
                             groups)


class _WeightGradient(torch.autograd.Function):
    """The convolution's weight gradient as a function of (grad_output, input); its own
    derivative is one convolution and one transposed convolution."""

    @staticmethod
    def forward(ctx: Any, g: Tensor, x: Tensor, weight: Tensor, stride: list[int],
                padding: list[int], dilation: list[int], groups: int) -> Tensor:
        ctx.save_for_backward(g, x)
        ctx.conf = (stride, padding, dilation, groups)
        return _aten.convolution_backward(g, x, weight, None, stride, padding, dilation, False,
                                          [0] * len(stride), groups, [False, True, False])[1]

    @staticmethod
    def backward(ctx: Any, gg_w: Tensor) -> tuple[Tensor | None, ...]:
        g, x = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        d_g = d_x = None
        if ctx.needs_input_grad[0]:
            d_g = _aten.convolution(x, gg_w, None, stride, padding, dilation, False,
                                    [0] * len(stride), groups)
        if ctx.needs_input_grad[1]:
            d_x = _input_gradient(g, gg_w, x, stride, padding, dilation, groups)
        return d_g, d_x, None, None, None, None, None


class _Convolution(torch.autograd.Function):
    """``conv{1,2,3}d`` with a backward that stays cheap to differentiate."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, stride: list[int],
                padding: list[int], dilation: list[int], groups: int) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        return _aten.convolution(x, weight, bias, stride, padding, dilation, False,
                                 [0] * len(stride), groups)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and ctx.has_bias
        if not torch.is_grad_enabled():  # no graph to build: PyTorch's fused backward
            gx, gw, gb = _aten.convolution_backward(
                g, x, weight, [weight.shape[0]] if ctx.has_bias else None, stride, padding,
                dilation, False, [0] * len(stride), groups, [need_x, need_w, need_b])
            return gx, gw, gb, None, None, None, None
        gx = _input_gradient(g, weight, x, stride, padding, dilation, groups) if need_x else None
        gw = (_WeightGradient.apply(g, x, weight.detach(), stride, padding, dilation, groups)
              if need_w else None)
        gb = g.sum([0, *range(2, g.dim())]) if need_b else None
        return gx, gw, gb, None, None, None, None


# ------------------------------------------------------------------------------- batch norm
class _BatchNormBackward(torch.autograd.Function):
    """Training-mode batch norm's backward, (g, x, weight) -> (grad_x, grad_weight, grad_bias),
    with its derivative in closed form.

    Per channel, with m values, x_hat = (x - mean) r and r = 1 / sqrt(var + eps):
    grad_x = weight r (g - mean(g) - x_hat mean(g x_hat)), grad_weight = sum(g x_hat),
    grad_bias = sum(g). For cotangents (A, a, b) of the three, with k = mean(A g) - mean(A)
    mean(g) - mean(g x_hat) mean(A x_hat) and c = weight r:
    d/dg = c A + (a - c mean(A x_hat)) x_hat + b - c mean(A);
    d/dweight = r m k;
    d/dx = r (G - mean(G) - x_hat mean(G x_hat)) - c r k x_hat, where
    G = a g - c (g mean(A x_hat) + A mean(g x_hat)) is the derivative in x_hat at fixed r.
    """

    @staticmethod
    def forward(ctx: Any, g: Tensor, x: Tensor, weight: Tensor | None, has_bias: bool,
                mean: Tensor, invstd: Tensor, eps: float) -> tuple[Tensor | None, ...]:
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(g, x, weight, mean, invstd)
        ctx.eps = eps
        return tuple(_aten.native_batch_norm_backward(
            g, x, weight, None, None, mean, invstd, True, eps,
            [True, weight is not None, has_bias]))

    @staticmethod
    def backward(ctx: Any, gg_x: Tensor | None, gg_w: Tensor | None,
                 gg_b: Tensor | None) -> tuple[Tensor | None, ...]:
        g, x, weight, mean, invstd = ctx.saved_tensors
        shape = [1, -1] + [1] * (x.dim() - 2)
        dims = [0, *range(2, x.dim())]
        if torch.is_grad_enabled():
            # This backward is itself differentiated (third order): the saved statistics carry
            # no graph to x, so compute them again from x, differentiably.
            mean = x.mean(dims)
            invstd = (x.var(dims, correction=0) + ctx.eps).rsqrt()
        r = invstd.view(shape)
        x_hat = (x - mean.view(shape)) * r
        c = r if weight is None else weight.view(shape) * r
        a = 0.0 if gg_w is None else gg_w.view(shape)
        g_mean = g.mean(dims, keepdim=True)
        gx_mean = (g * x_hat).mean(dims, keepdim=True)
        if gg_x is None:
            ax_mean = a_mean = k = 0.0
        else:
            a_mean = gg_x.mean(dims, keepdim=True)
            ax_mean = (gg_x * x_hat).mean(dims, keepdim=True)
            k = (gg_x * g).mean(dims, keepdim=True) - a_mean * g_mean - gx_mean * ax_mean
        need_g, need_x, need_w = ctx.needs_input_grad[:3]
        d_g = d_x = d_w = None
        if need_g:
            d_g = (a - c * ax_mean) * x_hat - c * a_mean
            if gg_x is not None:
                d_g = d_g + c * gg_x
            if gg_b is not None:
                d_g = d_g + gg_b.view(shape)
        if need_x:
            g_coeff = r * (a - c * ax_mean)
            big_g_mean = a * g_mean - c * (g_mean * ax_mean + a_mean * gx_mean)
            big_gx_mean = a * gx_mean - 2 * c * gx_mean * ax_mean
            d_x = g_coeff * g - r * (big_gx_mean + c * k) * x_hat - r * big_g_mean
            if gg_x is not None:
                d_x = d_x - (c * r * gx_mean) * gg_x
        if need_w and weight is not None and gg_x is not None:
            d_w = (r * k * (x.numel() // x.shape[1])).reshape(-1)
        return d_g, d_x, d_w, None, None, None, None


class _BatchNorm(torch.autograd.Function):
    """Training-mode ``batch_norm`` (running statistics updated as PyTorch does) with a backward
    that stays cheap to differentiate."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                running_mean: Tensor | None, running_var: Tensor | None, momentum: float,
                eps: float) -> Tensor:
        y, mean, invstd = _aten.native_batch_norm(x, weight, bias, running_mean, running_var,
                                                  True, momentum, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():
            gx, gw, gb = _BatchNormBackward.apply(g, x, weight, ctx.has_bias, mean, invstd,
                                                  ctx.eps)
            if recipes_wanted():
                setattr(gx, RECIPE, _InputGradientRecipe(
                    gx, (g, x, weight, mean, invstd), ctx.eps,
                    [True, weight is not None, ctx.has_bias]))
        else:
            gx, gw, gb = _aten.native_batch_norm_backward(
                g, x, weight, None, None, mean, invstd, True, ctx.eps,
                [ctx.needs_input_grad[0], weight is not None, ctx.has_bias])
        return gx, gw, gb, None, None, None, None


class _InputGradientRecipe(Recipe):
    """How to compute a batch norm's input gradient ``gx`` again from tensors its backward's
    graph keeps anyway (``g``, ``x``, the weight, the batch statistics), so that a graph built
    on ``gx`` (a convolution's backward saves it twice) need not keep ``gx`` itself: the first
    computation's kernel and output mask on the same inputs, whose versions are checked."""

    __slots__ = ("eps", "mask")

    def __init__(self, gx: Tensor, inputs: tuple[Tensor | None, ...], eps: float,
                 mask: list[bool]) -> None:
        super().__init__(gx, inputs)
        self.eps = eps
        self.mask = mask

    def evaluate(self) -> Tensor:
        g, x, weight, mean, invstd = self.checked_inputs()
        with torch.no_grad():  # autograd attaches the saved tensor's own graph edge
            return _aten.native_batch_norm_backward(
                g, x, weight, None, None, mean, invstd, True, self.eps, self.mask)[0]


def recomputed_batch_norm_gradients(forward_ops: Any) -> Any:
    """A context for the ``create_graph=True`` backward of a forward run under ``forward_ops``
    (what :func:`second_order_ops` returned for it): the graph it builds saves, in place of
    each routed batch norm's input gradient, how to compute it again (on ResNet-18 half of what
    that graph saves, for one batch norm backward per layer when it is differentiated). Every
    other tensor it saves is saved as autograd saves it, with autograd's check that it was not
    changed in place before use.

    A no-op context unless ``forward_ops`` routed a batch norm, and where saved-tensor hooks
    are already active (``save_on_cpu``, say: theirs decide what is kept) or disabled."""
    if (not isinstance(forward_ops, _SecondOrderOps) or not forward_ops.batch_norms
            or not recipes_possible()):
        return nullcontext()
    return saving_recipes()


# ------------------------------------------------------------------------------------- mode
def _bind(args: tuple, kwargs: dict[str, Any], names: tuple[str, ...],
          defaults: tuple) -> list[Any]:
    values = list(args) + list(defaults[len(args):])
    for key, value in kwargs.items():
        values[names.index(key)] = value
    return values


def _as_list(value: int | Sequence[int], dims: int) -> list[int]:
    return [value] * dims if isinstance(value, int) else list(value)


def _routable(x: Tensor) -> bool:
    """Whether the Functions take this input's dtype (else PyTorch's operation runs as it is)."""
    return x.dtype in _FLOATS and not torch.is_autocast_enabled(x.device.type)


def _routable_batch_norm(x: Tensor, training: bool) -> bool:
    """Whether a ``batch_norm`` call is one the modes compute themselves: training mode, a
    routable input, and more than one value per channel (for one, PyTorch's own call raises
    its error)."""
    return training and x.dim() >= 2 and _routable(x) and x.numel() > x.shape[1]


class InterceptingMode(TorchFunctionMode):
    """A ``TorchFunctionMode`` that hands each call to :meth:`intercept`, except while
    ``torch.compile`` traces (a compiled model or function called under the mode): what a
    trace records of our bookkeeping (tags and records on fake tensors, hooks it cannot
    trace, a recompilation per call signature) does not hold when the compiled code runs: a
    compiled ResNet under :class:`~metafair_opt._recomputed_activations.RecomputedActivations`
    got wrong final gradients (zero for some parameters of a ResNet-18). Compiled code runs as
    it was compiled, with PyTorch's own operations."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if torch.compiler.is_compiling():
            return func(*args, **kwargs)
        return self.intercept(func, args, kwargs)

    def intercept(self, func: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        """The call ``func(*args, **kwargs)``, as the mode handles it."""
        return func(*args, **kwargs)


class _SecondOrderOps(InterceptingMode):
    def __init__(self) -> None:
        super().__init__()
        self.batch_norms = 0  # how many batch norm calls it routed

    def intercept(self, func: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        dims = _CONVOLUTIONS.get(func)
        if dims is not None:
            x, weight, bias, stride, padding, dilation, groups = _bind(
                args, kwargs, _CONVOLUTION_ARGS, _CONVOLUTION_DEFAULTS)
            if not isinstance(padding, str) and x.dim() == dims + 2 and _routable(x):
                return _Convolution.apply(x, weight, bias, _as_list(stride, dims),
                                          _as_list(padding, dims), _as_list(dilation, dims),
                                          groups)
        elif func is F.batch_norm:
            x, running_mean, running_var, weight, bias, training, momentum, eps = _bind(
                args, kwargs, _BATCH_NORM_ARGS, _BATCH_NORM_DEFAULTS)
            if _routable_batch_norm(x, training):
                self.batch_norms += 1
                return _BatchNorm.apply(x, weight, bias, running_mean, running_var, momentum,
                                        eps)
        return func(*args, **kwargs)

