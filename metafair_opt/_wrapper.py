"""What both meta-optimisers share: the torch.optim-style shell around the user's optimizer."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from metafair_opt._functional import FunctionalModel, check_optimizer_holds

__all__ = ["MetaOptimizerBase"]


class MetaOptimizerBase:
    """``zero_grad``, ``param_groups``, configuration checks and the atomic commit of a step.

    Subclasses set ``self.model``, ``self.optimizer``, ``self.check_finite`` and implement
    :meth:`config`.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    check_finite: bool
    step_count: int

    def _attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self._fmodel = FunctionalModel(model)
        check_optimizer_holds(self._fmodel.named_params, optimizer)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The wrapped optimizer's parameter groups (read or change ``lr`` here).

        Learning-rate schedulers need a real optimizer: pass ``wrapper.optimizer`` to them.
        """
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of every parameter the wrapped optimizer holds."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def config(self) -> dict[str, Any]:  # pragma: no cover - every subclass overrides it
        raise NotImplementedError

    def _warn_if_config_differs(self, saved: Mapping[str, Any]) -> None:
        current = self.config()
        differing = {k: (v, current.get(k)) for k, v in saved.items() if current.get(k) != v}
        if differing:
            warnings.warn(
                f"Loading a {type(self).__name__} state saved with a different configuration "
                f"(saved, current): {differing}. The current configuration is kept.",
                stacklevel=3,
            )

    def _check_all_finite(
        self,
        watched: Sequence[tuple[str, Tensor]],
        grads: Sequence[Tensor | None],
        sentinel: Tensor | None,
    ) -> None:
        """One host sync for the step: ``sentinel`` (a loss every other loss flows into) plus
        the norms of ``grads``. Only when that is not finite are the ``watched`` losses
        inspected, to name the first non-finite one (in the order the step computed them).
        """
        present = [g for g in grads if g is not None]
        parts = [torch.stack(torch._foreach_norm(present)).sum()] if present else []
        if sentinel is not None:
            parts.append(sentinel.detach().sum())
        if not parts or bool(torch.isfinite(sum(parts))):
            return
        for name, value in watched:
            if not bool(torch.isfinite(value.detach()).all()):
                shown = (f"{value.detach().float().item():g}" if value.numel() == 1
                         else "a non-finite value")
                raise FloatingPointError(
                    f"The {name} is {shown}. Nothing was updated. Check the inputs for NaN/inf, "
                    "lower the learning rates, or clip the model outputs before the loss."
                )
        raise FloatingPointError(
            "The gradient to apply holds NaN or inf values although the losses are finite. "
            "Nothing was updated. A differentiable Adam inner step needs eps_root > 0 "
            "(e.g. torchopt.adam(lr, eps_root=1e-8)); otherwise lower the learning rates."
        )

    def _commit(
        self,
        grads: Sequence[Tensor | None],
        buffers: Mapping[str, Tensor],
        watched: Sequence[tuple[str, Tensor]] = (),
        sentinel: Tensor | None = None,
    ) -> None:
        """Check the step's losses and ``grads``, add ``grads`` to ``p.grad``, step the
        optimizer, then copy ``buffers`` in.

        If anything is not finite, or ``optimizer.step()`` raises, the previous gradients are
        put back and nothing else has been touched.
        """
        if self.check_finite:
            self._check_all_finite(watched, grads, sentinel)
        params = self._fmodel.params
        previous = [p.grad for p in params]
        try:
            for p, g in zip(params, grads):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad + g  # out of place: undoable
            self.optimizer.step()
        except BaseException:
            for p, old in zip(params, previous):
                p.grad = old
            raise
        self._fmodel.commit_buffers(buffers)

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({type(self.optimizer).__name__}, {settings})"
