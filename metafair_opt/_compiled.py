"""The one way both meta-optimisers compile their step: ``torch.compile`` of a ``torch.func``
form, one compiled function per wrapper, and one message when a trace fails."""

from __future__ import annotations

import functools
import itertools
import types
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["COMPILE_FAILURES", "compile_failure", "compile_method"]

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
