"""Batch norm, ReLU and residual-sum outputs that a graph saves as recipes.

The reweighter's forward-mode step keeps the training forward's graph through the validation
pass (it serves the final weighted gradient too), so at the step's peak two forward graphs are
alive. In a ResNet much of what such a graph saves are outputs of a batch norm followed by a
ReLU, or of ReLU(batch norm + shortcut): each saved by the ReLU (its output, for its mask) and by
the convolutions that read it (their input), while the batch norm keeps its own input anyway.

:class:`RecomputedActivations` runs a forward under a ``TorchFunctionMode`` that notes, for each
training-mode ``batch_norm`` output and for each in-place ReLU or sum (``+``, ``+=``, ``add``)
of such noted tensors, how to compute it again from the batch norms' inputs, weights and biases; its
saved-tensor hooks then save that recipe in place of the tensor (see
:mod:`metafair_opt._saved_recipes`). Only outputs of a graph those hooks save are noted (not
under ``no_grad``, of a frozen layer, or inside ``checkpoint`` or other hooks), so the batch
norm inputs a recipe keeps are ones that graph keeps anyway; tags are removed when the forward
ends. The values computed again are bit for bit the saved ones: the same calls
(``torch.batch_norm`` in training mode with the forward's cuDNN setting and throwaway running
statistics where the first call had some, so that it takes the same kernel; ``relu``; ``add``)
on the same inputs, with no torch-function mode or autocast in the way. A tensor changed in
place by anything else after it was noted is saved as it is; an out-of-place ReLU is not noted
(it saves its output before the mode could note it), nor a sum of operands with other strides.
A recipe checks the versions of what it computes from, the batch norm's bias included (which
the batch norm's own backward does not save): changing one in place before the graph is
differentiated raises autograd's error.

With ``keep=True`` the graph's first backward pass still gets the tensors themselves; after
:meth:`RecomputedActivations.release` they are dropped and computed again when needed.

Nothing is noted in code that ``torch.compile`` traces (a compiled model, say): it runs as it
was compiled, its saved tensors saved as they are (see
:class:`~metafair_opt._second_order.InterceptingMode`).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metafair_opt._saved_recipes import (
    RECIPE,
    Recipe,
    pack,
    recipes_possible,
    unpack,
)
from metafair_opt._second_order import (
    _BATCH_NORM_ARGS,
    _BATCH_NORM_DEFAULTS,
    InterceptingMode,
    _bind,
    _routable_batch_norm,
)

__all__ = ["RecomputedActivations", "has_batch_norm"]

# ReLU saves its output while it runs, before the mode could note it: only an in-place ReLU's
# output (the tensor it is given, one version on) can be noted in advance.
_IN_PLACE_RELUS = {torch.relu_, Tensor.relu_, F.relu_}
_SUMS = {torch.add, Tensor.add, Tensor.__add__, Tensor.add_, Tensor.__iadd__}


def has_batch_norm(model: nn.Module) -> bool:
    """Whether ``model`` holds a batch norm module (without one there is nothing to note)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class _Activation(Recipe):
    """A noted activation: computed from batch norm inputs, ReLUs and sums."""

    __slots__ = ()


@contextmanager
def _as_in_the_forward(like: Tensor) -> Iterator[None]:
    """The settings the noted calls ran under: no graph, no torch-function mode (modes active
    during a backward would see these calls) and no autocast (the noted calls ran without)."""
    with (torch.no_grad(), torch._C.DisableTorchFunction(),
          torch.autocast(like.device.type, enabled=False)):
        yield


class _BatchNormOutput(_Activation):
    __slots__ = ("cudnn", "eps", "running_dtype")

    def __init__(self, y: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                 running_dtype: torch.dtype | None, eps: float) -> None:
        super().__init__(y, (x, weight, bias))
        self.running_dtype = running_dtype
        self.eps = eps
        # F.batch_norm's kernel choice, as it was in the forward (the backward may run where
        # it differs).
        self.cudnn = torch.backends.cudnn.enabled

    def evaluate(self) -> Tensor:
        x, weight, bias = self.checked_inputs()
        assert x is not None
        with _as_in_the_forward(x):
            running_mean = running_var = None
            if self.running_dtype is not None:
                channels = x.shape[1]
                running_mean = torch.zeros(channels, dtype=self.running_dtype, device=x.device)
                running_var = torch.ones(channels, dtype=self.running_dtype, device=x.device)
            return torch.batch_norm(x, weight, bias, running_mean, running_var, True, 0.0,
                                    self.eps, self.cudnn)


class _Relu(_Activation):
    __slots__ = ("source",)

    def __init__(self, y: Tensor, source: _Activation, version: int) -> None:
        super().__init__(y, version=version)
        self.source = source

    def evaluate(self) -> Tensor:
        value, writable = self.source.source_value()
        with _as_in_the_forward(value):  # in place where it can: the memory traffic is the cost
            return value.relu_() if writable else torch.relu(value)


class _Sum(_Activation):
    __slots__ = ("sources",)

    def __init__(self, y: Tensor, sources: tuple[_Activation, _Activation]) -> None:
        super().__init__(y)
        self.sources = sources

    def evaluate(self) -> Tensor:
        (a, a_writable), (b, b_writable) = (source.source_value() for source in self.sources)
        with _as_in_the_forward(a):
            if a_writable:
                return a.add_(b)
            return b.add_(a) if b_writable else torch.add(a, b)


def _noted(t: Any) -> _Activation | None:
    """``t``'s recipe if it is a noted activation that nothing has changed since."""
    recipe = getattr(t, RECIPE, None) if isinstance(t, Tensor) else None
    return recipe if isinstance(recipe, _Activation) and recipe.live_for(t) else None


class _Noting(InterceptingMode):
    def __init__(self, pack: Any) -> None:
        super().__init__()
        self.pack = pack  # the hooks' pack function: noting is for graphs those hooks save
        # The running call's tensor arguments (id -> version when the call began), so that the
        # hooks can tell a saved input from a saved output.
        self.inputs: dict[int, int] = {}
        self.noted: list[weakref.ref[Tensor]] = []

    def intercept(self, func: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        outer = self.inputs
        self.inputs = {id(t): t._version for t in (*args, *kwargs.values())
                       if isinstance(t, Tensor) and not t.is_inference()}
        try:
            return self._note(func, args, kwargs)
        finally:
            self.inputs = outer

    def _saving(self, output: Any) -> bool:
        """Whether ``output`` is part of a graph that our hooks save (not under ``no_grad``,
        not of a frozen layer, not inside ``checkpoint`` or other hooks): a noted output's
        recipe keeps batch norm inputs that only such a graph keeps anyway."""
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
        return (isinstance(output, Tensor) and output.requires_grad
                and hooks is not None and hooks[0] is self.pack)

    def _tag(self, t: Tensor, recipe: Recipe | None) -> None:
        if recipe is not None:
            setattr(t, RECIPE, recipe)
            self.noted.append(weakref.ref(t))
        elif hasattr(t, RECIPE):
            delattr(t, RECIPE)

    def _note(self, func: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        if func is F.batch_norm:
            output = func(*args, **kwargs)
            x, running_mean, _, weight, bias, training, _, eps = _bind(
                args, kwargs, _BATCH_NORM_ARGS, _BATCH_NORM_DEFAULTS)
            if (self._saving(output) and _routable_batch_norm(x, training)
                    and output.dtype == x.dtype):
                running = None if running_mean is None else running_mean.dtype
                self._tag(output, _BatchNormOutput(output, x, weight, bias, running, eps))
            return output
        if func in _IN_PLACE_RELUS or (func is F.relu and _bind(
                args, kwargs, ("input", "inplace"), (None, False))[1]):
            t = args[0] if args else kwargs.get("input")
            source = _noted(t)
            if source is None or not self._saving(t):
                return func(*args, **kwargs)
            # Noted before the call: ReLU saves its output while it runs.
            recipe = _Relu(t, source, t._version + 1)
            self._tag(t, recipe)
            try:
                output = func(*args, **kwargs)
            except BaseException:
                self._tag(t, source)  # unchanged: its recipe before the call still gives it
                raise
            if output is not t or t._version != recipe.version:
                self._tag(t, None)
            return output
        if func in _SUMS and len(args) == 2 and not kwargs:
            a, b = (_noted(t) for t in args)
            output = func(*args, **kwargs)
            # The same strides too: the value computed again takes one operand's.
            if (a is not None and b is not None and self._saving(output)
                    and output.shape == args[0].shape == args[1].shape
                    and output.dtype == args[0].dtype == args[1].dtype
                    and output.stride() == args[0].stride() == args[1].stride()):
                self._tag(output, _Sum(output, (a, b)))
            return output
        return func(*args, **kwargs)

    def __exit__(self, *exc: Any) -> Any:
        # The tags serve the hooks only: a tensor that outlives the forward keeps no recipe
        # (which would keep the batch norm inputs it computes from).
        for ref in self.noted:
            t = ref()
            if t is not None and hasattr(t, RECIPE):
                delattr(t, RECIPE)
        self.noted = []
        return super().__exit__(*exc)


class RecomputedActivations:
    """Forwards whose graphs save noted activations as recipes (see the module's docstring).

    ``with activations.forward(): out = model(x)``; with ``keep=True`` the tensors themselves
    serve every unpack until :meth:`release`. A no-op where ``enabled`` is False or saved-tensor
    hooks of others are active or hooks are disabled."""

    def __init__(self, enabled: bool = True, keep: bool = False) -> None:
        self.enabled = enabled
        self.keep = keep
        self._kept: list[Recipe] = []

    def forward(self) -> Any:
        """The context for a forward (the mode and the saved-tensor hooks)."""
        if not self.enabled or not recipes_possible():
            return nullcontext()
        def pack_noted(t: Tensor) -> Any:
            if noting.inputs.get(id(t)) == t._version and getattr(t, RECIPE, None) is None:
                # An argument of the running call, unchanged: its graph leads only to earlier
                # nodes, so it is kept as it is (as autograd keeps it without hooks), not
                # detached. The forward replay's record finds a convolution's output by a weak
                # reference to that very tensor object.
                return t, t._version
            packed = pack(t)
            if self.keep and isinstance(packed, Recipe) and not packed.kept:
                packed.keep(t)
                self._kept.append(packed)
            return packed

        noting = _Noting(pack_noted)
        stack = ExitStack()
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack_noted, unpack))
        stack.enter_context(noting)
        return stack

    def release(self) -> None:
        """Drop the kept tensors: the graph computes them again when it needs them."""
        for recipe in self._kept:
            recipe.release()
        self._kept.clear()
