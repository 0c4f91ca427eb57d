"""A forward-mode pass that reuses the convolution outputs of a forward it repeats.

The reweighter's forward-mode weight gradient (``weight_grad_mode="forward"``) runs the training
forward a second time with dual parameters: the primal values of that pass are the ones the
training forward already computed, and only the tangents are new. For a convolution the tangent
costs two convolutions (``conv(x_t, W) + conv(x, W_t)``), so recomputing the primal makes it three;
on the benchmark's ResNet-18 the primal convolutions were about a quarter of the pass.

:func:`recording_primals` notes, while the training forward runs, each convolution's output in
call order; :func:`replaying_primals`, during the dual pass of the same model at the same
parameters on the same batch (random draws and buffers as the training forward had them), hands
those outputs back as the primal and computes only the tangent. The record holds weak
references: an output that the training forward's graph does not keep alive (one only an
out-of-place ReLU read, say) is gone by then and is computed again, so the record costs no
memory. A recorded output is taken only if the call lines up with the recording (the same
weight, by storage or by value, and input shape) and nothing has written to it in place since
(writes through ``.data`` bypass that check); from the first call that does not line up on,
every convolution is computed in full. Calls under autocast are neither recorded nor taken, nor
calls in code that ``torch.compile`` traces.
The pass is for values: the recorded outputs come back detached and the tangents are
computed without a reverse-mode graph, so neither can be differentiated again.

Training-mode batch norm gets its tangent from PyTorch's fused kernels (the input term is batch
norm's own backward kernel, as its Jacobian in the input is symmetric) instead of the composite
of a dozen full-size operations PyTorch's forward-mode formula builds.
"""

from __future__ import annotations

import weakref
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F
from torch import Tensor

from metafair_opt._second_order import (
    _BATCH_NORM_ARGS,
    _BATCH_NORM_DEFAULTS,
    _CONVOLUTION_ARGS,
    _CONVOLUTION_DEFAULTS,
    _CONVOLUTIONS,
    InterceptingMode,
    _bind,
    _routable,
    _routable_batch_norm,
)

__all__ = ["PrimalRecord", "recording_primals", "replaying_primals"]

_aten = torch.ops.aten


@dataclass
class _RecordedOutput:
    output: weakref.ref[Tensor]
    version: int  # the output's _version when recorded: a later in-place write changes it
    weight: Tensor
    weight_version: int
    input_shape: torch.Size


@dataclass
class PrimalRecord:
    """The convolution outputs of one forward, in call order, and how far a replay has got."""

    outputs: list[_RecordedOutput] = field(default_factory=list)
    position: int = 0
    aligned: bool = True  # False once a replayed call did not line up with the recording
    reused: int = 0  # how many outputs the replay took (the tests read it)

    def take(self, x: Tensor, weight: Tensor) -> Tensor | None:
        """The recorded output for this call of the replay, or None (then computed)."""
        if not self.aligned or self.position >= len(self.outputs):
            self._stop()
            return None
        entry = self.outputs[self.position]
        self.position += 1
        # The same weight: unchanged since the recording, and the very tensor or one equal to
        # it (a weight recomputed by a parametrization, a buffer on another copy).
        if not (entry.input_shape == x.shape and entry.weight.shape == weight.shape
                and entry.weight._version == entry.weight_version
                and ((entry.weight.data_ptr() == weight.data_ptr()
                     and entry.weight.stride() == weight.stride())
                     or torch.equal(entry.weight, weight))):
            self._stop()
            return None
        output = entry.output()
        if output is None or output._version != entry.version:
            return None  # freed, or written to: computed again, and the next ones still line up
        self.reused += 1
        return output.detach()

    def _stop(self) -> None:
        self.aligned = False
        self.outputs.clear()


def recording_primals(record: PrimalRecord | None) -> Any:
    """A context that appends each convolution's output to ``record`` (a no-op for None)."""
    return _Recording(record) if record is not None else nullcontext()


def replaying_primals(record: PrimalRecord | None) -> Any:
    """A context for the dual pass that repeats ``record``'s forward (see the module's
    docstring; a no-op for None). ``record`` is emptied on exit."""
    return _Replaying(record) if record is not None else nullcontext()


class _Recording(InterceptingMode):
    def __init__(self, record: PrimalRecord) -> None:
        super().__init__()
        self.record = record

    def intercept(self, func: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        output = func(*args, **kwargs)
        if func in _CONVOLUTIONS:
            x, weight = _bind(args, kwargs, _CONVOLUTION_ARGS, _CONVOLUTION_DEFAULTS)[:2]
            # Under autocast the output's dtype is autocast's, which the dual pass (float16
            # autocast off) may not share: such calls are skipped here and in the replay alike.
            if _routable(x):
                self.record.outputs.append(_RecordedOutput(
                    weakref.ref(output), output._version, weight, weight._version, x.shape))
        return output


def _split(t: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    if t is None:
        return None, None
    primal, tangent = fwad.unpack_dual(t)
    return primal, tangent


class _Replaying(InterceptingMode):
    def __init__(self, record: PrimalRecord) -> None:
        super().__init__()
        self.record = record

    def __exit__(self, *exc: Any) -> Any:
        self.record.outputs.clear()
        return super().__exit__(*exc)

    def intercept(self, func: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        if func in _CONVOLUTIONS:
            return self._convolution(func, _bind(args, kwargs, _CONVOLUTION_ARGS,
                                                 _CONVOLUTION_DEFAULTS))
        if func is F.batch_norm:
            x, running_mean, running_var, weight, bias, training, momentum, eps = _bind(
                args, kwargs, _BATCH_NORM_ARGS, _BATCH_NORM_DEFAULTS)
            if _routable_batch_norm(x, training):
                return _batch_norm(x, running_mean, running_var, weight, bias, momentum, eps)
        return func(*args, **kwargs)

    def _convolution(self, func: Any, values: list[Any]) -> Tensor:
        x, weight, bias, stride, padding, dilation, groups = values
        (x_p, x_t), (w_p, w_t), (b_p, b_t) = _split(x), _split(weight), _split(bias)
        assert x_p is not None and w_p is not None
        primal = self.record.take(x_p, w_p) if _routable(x_p) else None
        if primal is None:
            primal = func(x_p, w_p, b_p, stride, padding, dilation, groups)
        with torch.no_grad():  # the tangent is no part of a reverse-mode graph of the primal
            tangent = None
            if x_t is not None:
                tangent = func(x_t, w_p, None, stride, padding, dilation, groups)
            if w_t is not None:
                term = func(x_p, w_t, b_t, stride, padding, dilation, groups)
                tangent = term if tangent is None else tangent.add_(term)
            elif b_t is not None:
                # One value per output channel, broadcast from the right (batched or not).
                term = b_t.view([-1] + [1] * (w_p.dim() - 2)).expand_as(primal)
                tangent = term.clone() if tangent is None else tangent.add_(term)
        return primal if tangent is None else fwad.make_dual(primal, tangent)


def _batch_norm(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                weight: Tensor | None, bias: Tensor | None, momentum: float,
                eps: float) -> Tensor:
    """Training-mode batch norm of possibly dual inputs. With x_hat = (x - mean) r, the tangent
    is weight r (x_t - mean(x_t) - x_hat mean(x_t x_hat)) + weight_t x_hat + bias_t; the first
    term is the input gradient batch norm's backward kernel computes for grad_output = x_t."""
    (x_p, x_t), (w_p, w_t), (b_p, b_t) = _split(x), _split(weight), _split(bias)
    assert x_p is not None
    primal, mean, invstd = _aten.native_batch_norm(x_p, w_p, b_p, running_mean, running_var,
                                                   True, momentum, eps)
    with torch.no_grad():
        tangent = None
        if x_t is not None:
            tangent = _aten.native_batch_norm_backward(
                x_t, x_p, w_p, None, None, mean, invstd, True, eps, [True, False, False])[0]
        if w_t is not None:
            # Batch norm with weight_t and bias_t as its affine part is weight_t x_hat + bias_t.
            term = _aten.native_batch_norm(x_p, w_t, b_t, None, None, True, 0.0, eps)[0]
            tangent = term if tangent is None else tangent.add_(term)
        elif b_t is not None:
            term = b_t.view([1, -1] + [1] * (x_p.dim() - 2)).expand_as(primal)
            tangent = term.clone() if tangent is None else tangent.add_(term)
    return primal if tangent is None else fwad.make_dual(primal, tangent)
