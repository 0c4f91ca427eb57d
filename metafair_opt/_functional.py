"""Functional plumbing shared by both meta-optimisers.

Both algorithms evaluate the user's model at parameters that are not the module's own (adapted
inner-loop parameters, a look-ahead step). This module owns the one way we do that:
``torch.func.functional_call`` over a fixed, ordered tuple of the model's trainable parameters,
with buffers cloned so that look-ahead forwards never touch BatchNorm running statistics and the
committed forward changes them only once the whole step has succeeded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

#: What a model accepts: a tensor, a tuple of tensors (``model(*x)``) or a dict (``model(**x)``).
Batch = Tensor | tuple | list | Mapping[str, Any]

__all__ = [
    "Batch",
    "FunctionalModel",
    "batch_size",
    "check_optimizer_holds",
    "check_same_batch_size",
    "describe_shape",
    "differentiable_sgd_update",
    "select_rows",
]


def _tensors_of(batch: Batch) -> list[Tensor]:
    if isinstance(batch, Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [v for v in batch.values() if isinstance(v, Tensor)]
    if isinstance(batch, (tuple, list)):
        return [v for v in batch if isinstance(v, Tensor)]
    raise TypeError(
        f"Expected a tensor, a tuple of tensors or a dict of tensors, got {type(batch).__name__}."
    )


def describe_shape(batch: Batch) -> str:
    """A short text form of a batch's shape(s), for error messages."""
    if isinstance(batch, Tensor):
        return str(tuple(batch.shape))
    if isinstance(batch, Mapping):
        parts = [f"{k}: {tuple(v.shape)}" for k, v in batch.items() if isinstance(v, Tensor)]
        return "{" + ", ".join(parts) + "}"
    return "(" + ", ".join(str(tuple(t.shape)) for t in _tensors_of(batch)) + ")"


def batch_size(batch: Batch, name: str) -> int:
    """The number of rows in ``batch``; every tensor in it must agree (dim 0)."""
    tensors = _tensors_of(batch)
    if not tensors:
        raise ValueError(f"{name} holds no tensor, so its batch size is unknown.")
    sizes = {t.shape[0] if t.dim() > 0 else None for t in tensors}
    if None in sizes:
        raise ValueError(f"{name} holds a 0-dim tensor; every input needs a batch dimension.")
    if len(sizes) != 1:
        raise ValueError(
            f"The tensors in {name} disagree on the batch size: {describe_shape(batch)}. "
            "Every tensor needs the same first dimension."
        )
    return next(iter(sizes))


def check_same_batch_size(x: Batch, y: Batch, x_name: str = "x", y_name: str = "y") -> int:
    """Raise a ValueError naming both shapes unless ``x`` and ``y`` hold the same number of rows."""
    nx, ny = batch_size(x, x_name), batch_size(y, y_name)
    if nx != ny:
        raise ValueError(
            f"{x_name} and {y_name} have different batch sizes: {x_name} has shape "
            f"{describe_shape(x)} ({nx} rows) and {y_name} has shape {describe_shape(y)} "
            f"({ny} rows). Pass inputs and targets for the same rows."
        )
    return nx


def differentiable_sgd_update(
    params: Sequence[Tensor], grads: Sequence[Tensor], step: float | Tensor
) -> tuple[Tensor, ...]:
    """``params + step * grads`` (``step`` is minus the learning rate for a descent step),
    recorded by autograd: the update of an inner or look-ahead step.

    One ``torch.add`` per tensor rather than one fused ``torch._foreach_add``: the fused op's
    autograd node keeps ``grads`` alive until its graph is freed (a whole extra copy of the
    model's gradients at the outer backward's peak), the per-tensor add saves nothing.
    ``step`` is a 0-dim tensor in the steps ``torch.compile`` traces, where a float would be
    baked into the graph (and a new rate would compile it again).
    """
    if isinstance(step, Tensor):
        return tuple(p + step * g for p, g in zip(params, grads))
    return tuple(torch.add(p, g, alpha=step) for p, g in zip(params, grads))


def select_rows(batch: Batch, rows: Tensor) -> Batch:
    """Index every tensor of ``batch`` along dim 0 with ``rows`` (a boolean mask or indices)."""
    if isinstance(batch, Tensor):
        return batch[rows.to(batch.device)]
    if isinstance(batch, Mapping):
        return {k: (v[rows.to(v.device)] if isinstance(v, Tensor) else v) for k, v in batch.items()}
    return type(batch)(v[rows.to(v.device)] if isinstance(v, Tensor) else v for v in batch)


def check_optimizer_holds(named_params: Sequence[tuple[str, Tensor]], optimizer: Any) -> None:
    """Raise a ValueError unless every trainable parameter of the model is in ``optimizer``."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [name for name, p in named_params if id(p) not in held]
    if missing:
        shown = ", ".join(missing[:5])
        if len(missing) > 5:
            shown += f" and {len(missing) - 5} more"
        raise ValueError(
            f"The optimizer does not hold {len(missing)} trainable parameter(s) of the model: "
            f"{shown}. Build the optimizer from this model's parameters, e.g. "
            "torch.optim.Adam(model.parameters()), after any layer surgery, or set "
            "requires_grad=False on parameters that should stay frozen."
        )


class FunctionalModel:
    """Calls an ``nn.Module`` at parameters that are not its own, without replacing them.

    ``params`` is the ordered tuple of the module's trainable parameters (``requires_grad``;
    tied weights appear once). Frozen parameters stay in the module and are used as they are.
    Buffers are passed explicitly so that a forward can run against a throw-away copy.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("The model has no trainable parameters (requires_grad=True).")
        self.named_params: tuple[tuple[str, Tensor], ...] = tuple(named)
        self.param_names: tuple[str, ...] = tuple(n for n, _ in named)
        self.params: tuple[Tensor, ...] = tuple(p for _, p in named)
        self.buffer_names: tuple[str, ...] = tuple(n for n, _ in module.named_buffers())
        # functional_call's tie detection costs about a third of its overhead per call; pay it
        # only when the module really shares a tensor under two names.
        self._tied = (
            len(list(module.named_parameters(remove_duplicate=False)))
            != len(list(module.named_parameters()))
            or len(list(module.named_buffers(remove_duplicate=False))) != len(self.buffer_names)
        )

    def clone_buffers(self) -> dict[str, Tensor]:
        """A copy of every buffer, for a forward whose buffer updates may be discarded."""
        return {n: b.clone() for n, b in self.module.named_buffers()}

    def commit_buffers(self, buffers: Mapping[str, Tensor]) -> None:
        """Copy the values of ``buffers`` (from :meth:`clone_buffers`) into the module."""
        if not buffers:
            return
        with torch.no_grad():
            for name, live in self.module.named_buffers():
                live.copy_(buffers[name])

    def __call__(self, params: Sequence[Tensor], buffers: Mapping[str, Tensor], x: Batch) -> Any:
        """``model(x)`` evaluated at ``params`` (in ``param_names`` order) and ``buffers``."""
        if params is self.params and not buffers:
            # The module's own parameters and no buffers to redirect: a plain call is the same
            # computation without functional_call's swapping.
            if isinstance(x, Tensor):
                return self.module(x)
            return self.module(**x) if isinstance(x, Mapping) else self.module(*x)
        return self.call_at(params, buffers, x)

    def call_at(self, params: Sequence[Tensor], buffers: Mapping[str, Tensor], x: Batch) -> Any:
        """``model(x)`` at ``params`` and ``buffers`` through ``functional_call`` always (no
        identity test that would break a ``torch.compile`` trace)."""
        tensors = dict(zip(self.param_names, params))
        if buffers:
            tensors.update(buffers)
        if isinstance(x, Tensor):
            args, kwargs = (x,), None
        elif isinstance(x, Mapping):
            args, kwargs = (), dict(x)
        else:
            args, kwargs = tuple(x), None
        return functional_call(self.module, tensors, args, kwargs, tie_weights=self._tied)


LossFn = Callable[..., Tensor]

