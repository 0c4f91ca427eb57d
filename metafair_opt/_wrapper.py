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

    def _commit(self, grads: Sequence[Tensor | None], buffers: Mapping[str, Tensor]) -> None:
        """Add ``grads`` to ``p.grad``, step the optimizer, then copy ``buffers`` in.

        If the gradients are not finite, or ``optimizer.step()`` raises, the previous gradients
        are put back and nothing else has been touched.
        """
        params = self._fmodel.params
        present = [g for g in grads if g is not None]
        if self.check_finite and present and not bool(
            torch.stack([g.isfinite().all() for g in present]).all()
        ):
            raise FloatingPointError(
                "The gradient to apply holds NaN or inf values although the losses are finite. "
                "Nothing was updated. A differentiable Adam inner step needs eps_root > 0 "
                "(e.g. torchopt.adam(lr, eps_root=1e-8)); otherwise lower the learning rates."
            )
        previous = [p.grad for p in params]
        try:
            for p, g in zip(params, grads):
                if g is not None:
                    g = g.detach()
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
