"""The one way both meta-optimisers compile their step: ``torch.compile`` of a ``torch.func``
form, one compiled function per wrapper, and one message when a trace fails."""

from __future__ import annotations

import functools
import itertools
import math
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from metafair_opt._random import RngSnapshot, replaying, restore_rng

__all__ = [
    "COMPILE_FAILURES",
    "check_against_eager",
    "compile_failure",
    "compile_method",
    "raise_for_compiled_model",
]

#: What a ``fullgraph=True`` call raises when torch.compile cannot handle the step.
COMPILE_FAILURES: tuple[type[BaseException], ...] = (
    torch._dynamo.exc.TorchDynamoException,
    torch._dynamo.exc.FailOnRecompileLimitHit,
)

_copies = itertools.count()


def compile_method(method: Any) -> Callable[..., Any]:
    """``torch.compile(method, fullgraph=True)`` on a copy of the method's code of its own.

    torch.compile caches compiled graphs per code object, up to ``recompile_limit`` (8)
    variants; past that, a ``fullgraph=True`` compile fails. With a copy per wrapper, a process
    that builds many wrappers (a sweep over configurations) gives each its own cache instead of
    sharing one. ``fallback_random``: dropout draws from torch's generator as in eager mode
    (Inductor's own random numbers would give a different, if equally random, step).
    """
    assert isinstance(method, types.MethodType), "a bound method, undecorated"
    function = method.__func__
    # A name of its own as well: torch.compile also remembers which dimensions turned out
    # dynamic per function name and place, and would carry that from one wrapper to the next.
    code = function.__code__.replace(co_name=f"{function.__name__}_{next(_copies)}")
    own = types.FunctionType(code, function.__globals__, function.__name__,
                             function.__defaults__, function.__closure__)
    own.__kwdefaults__ = function.__kwdefaults__
    functools.update_wrapper(own, function)
    return torch.compile(types.MethodType(own, method.__self__), fullgraph=True,
                         options={"fallback_random": True})


def compile_failure(error: BaseException, owner: str) -> ValueError:
    """The error to raise when torch.compile failed on a step whose eager form runs.

    ``owner`` names the class to rebuild with ``compiled=False``.
    """
    if isinstance(error, torch._dynamo.exc.FailOnRecompileLimitHit):
        reason = ("its recompile limit was reached: the step's inputs or settings changed "
                  "(dtype, device, configuration) more often than "
                  "torch._dynamo.config.recompile_limit allows")
    else:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        context = [line for line in lines if line.startswith("Developer debug context")]
        reason = (context or lines or [""])[0][:300]
    return ValueError(
        f"torch.compile could not compile this step ({type(error).__name__}: {reason}). "
        f"Nothing was updated. Build the {owner} with compiled=False (the same step in eager "
        "autograd)."
    )


#: What torch raises when the backward of a model compiled by the user with an aot_autograd
#: backend (the default, inductor, is one) is differentiated once more: this, or first, where
#: the compiled backward donates buffers, an error that suggests turning that off (after which
#: the first comes).
_DOUBLE_BACKWARD = "does not currently support double backward"
_DONATED_BUFFERS = "compiled with non-empty donated buffers"


def raise_for_compiled_model(error: RuntimeError, owner: str, remedy: str) -> None:
    """Raise, instead of torch's ``error``, one that says what happened and what works, when a
    step that differentiates the model's backward (a second-order one) met a model, module or
    loss function the user had compiled with ``torch.compile``, whose backward torch cannot
    differentiate; return for any other error (the caller re-raises it).

    ``remedy`` says which settings of ``owner`` need no such double backward. Refusing compiled
    models up front would refuse the ones that work: the backend ``"eager"`` differentiates
    twice, and first-order steps never do.
    """
    message = str(error)
    if _DOUBLE_BACKWARD in message or _DONATED_BUFFERS in message:
        raise RuntimeError(
            f"This {owner} step differentiates the model's backward, and the model (or a module "
            "inside it, or the loss function) was compiled with torch.compile, whose compiled "
            "backward cannot be differentiated again (aot_autograd does not support double "
            "backward; turning off its donated buffers does not change that). Nothing was "
            f"updated. {remedy}"
        ) from error


#: Largest relative difference (L2, over all tensors together) between a compiled step's
#: results and eager autograd's that :func:`check_against_eager` accepts: rounding moves them
#: by about 1e-6 in float32; what it guards against moves them by tens of percent.
AGREEMENT_TOLERANCE = 1e-3
#: The same for float16 or bfloat16 (autocast or parameters), where both round far more.
LOW_PRECISION_AGREEMENT_TOLERANCE = 5e-2


def check_against_eager(compiled: Sequence[Sequence[Tensor | None]],
                        eager_step: Callable[[], Sequence[Sequence[Tensor | None]]],
                        before: RngSnapshot, what: str, owner: str) -> bool:
    """Run ``eager_step`` with the random generators at ``before`` (the state the compiled
    step started from, so that dropout draws alike) and raise a ValueError unless each group of
    its results equals the same group of ``compiled`` results (``None`` counts as zeros) to
    rounding; ``what`` names the groups. On that error the generators are put back to
    ``before``, so that the failed step has drawn nothing.

    Run on a wrapper's first compiled step: torch.compile (2.15) does not differentiate every
    operation as eager autograd does; a custom ``torch.autograd.Function``'s backward, for one,
    is not differentiated again, so a second-order term silently vanishes. Groups whose eager
    values are not finite cannot be compared (the step's own finiteness check reports them):
    returns whether every group was compared.
    """
    with replaying(before):
        eager = eager_step()
    try:
        return _compare(compiled, eager, what, owner)
    except ValueError:
        restore_rng(before)
        raise


def _compare(compiled: Sequence[Sequence[Tensor | None]],
             eager: Sequence[Sequence[Tensor | None]], what: str, owner: str) -> bool:
    tensors = [t for group in eager for t in group if t is not None]
    device = tensors[0].device
    low_precision = any(t.dtype in (torch.float16, torch.bfloat16) for t in tensors) or (
        torch.is_autocast_enabled(device.type)
        and torch.get_autocast_dtype(device.type) in (torch.float16, torch.bfloat16))
    tolerance = LOW_PRECISION_AGREEMENT_TOLERANCE if low_precision else AGREEMENT_TOLERANCE
    compared_all = True
    for name, ours, reference in zip(what.split(", "), compiled, eager, strict=True):
        pairs = [(a, b) for a, b in zip(ours, reference, strict=True)
                 if a is not None or b is not None]
        with torch.no_grad():
            gap = torch.stack([(_dense(a, b).double() - _dense(b, a).double()).norm()
                               for a, b in pairs])
            size = torch.stack([_dense(b, a).double().norm() for a, b in pairs])
            gap_norm, size_norm = float(gap.norm()), float(size.norm())
        if not math.isfinite(size_norm):
            compared_all = False
            continue
        relative = gap_norm / size_norm if size_norm > 0 else gap_norm
        if not relative <= tolerance:
            raise ValueError(
                f"compiled=True computed a different {name} from eager autograd on the first "
                f"step (relative difference {relative:.3g}, more than rounding). torch.compile "
                "does not differentiate every operation as eager autograd does: a custom "
                "torch.autograd.Function's backward, for one, is not differentiated again. "
                f"Nothing was updated. Build the {owner} with compiled=False."
            )
    return compared_all


def _dense(value: Tensor | None, like: Tensor | None) -> Tensor:
    """``value``, or zeros shaped as ``like`` where it is None."""
    if value is not None:
        return value.detach()
    assert like is not None
    return torch.zeros_like(like)
