"""What both meta-optimisers share: the torch.optim-style shell around the user's optimizer."""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from metafair_opt._functional import FunctionalModel, check_optimizer_holds
from metafair_opt._second_order import has_second_order_ops
from metafair_opt.distributed import SyncMode, resolve_model

__all__ = ["MetaOptimizerBase"]


class MetaOptimizerBase(ABC):
    """``zero_grad``, ``param_groups``, configuration checks and the atomic commit of a step.

    Subclasses set ``self.model``, ``self.optimizer``, ``self.check_finite`` and implement
    :meth:`config`.

    Loss scaling (float16 autocast): with a ``grad_scaler`` every loss that is differentiated
    is multiplied by the scaler's current scale; gradients used inside the step (inner steps,
    look-ahead, weight gradients) are divided by it again, differentiably, and the final
    gradients go to ``grad_scaler.step(optimizer)`` still scaled, followed by
    ``grad_scaler.update()``. A step whose scaled gradients overflow while the loss at the
    current parameters is finite changes nothing but the scale, which backs off.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    check_finite: bool
    step_count: int
    grad_scaler: torch.amp.GradScaler | None
    compiled: bool

    def _attach(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        grad_scaler: torch.amp.GradScaler | None = None,
        sync: SyncMode = "outer",
    ) -> None:
        self.model, self.optimizer = model, optimizer
        module, self._coll = resolve_model(model, sync)
        self.sync: SyncMode = sync
        self._fmodel = FunctionalModel(module)
        # Whether the second-order forwards route convolutions and batch norm (none to route
        # would only cost the mode's per-call overhead).
        self._second_order_ops = has_second_order_ops(module)
        check_optimizer_holds(self._fmodel.named_params, optimizer)
        if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
            raise TypeError(
                f"grad_scaler must be a torch.amp.GradScaler; got {type(grad_scaler).__name__}."
            )
        self.grad_scaler = grad_scaler if grad_scaler is not None and grad_scaler.is_enabled() \
            else None
        self._scale: float | None = None
        self._scaler_started = False

    def _set_compiled(self, compiled: bool) -> None:
        """Take ``compiled`` (after :meth:`_attach`), refusing what the compiled step lacks."""
        self.compiled = bool(compiled)
        if self.compiled and (self.grad_scaler is not None or self._coll.distributed):
            raise ValueError(
                f"compiled=True works in one process without loss scaling; build the "
                f"{type(self).__name__} with compiled=False for grad_scaler or a "
                "DistributedDataParallel model (or use bfloat16 autocast, which needs no "
                "scaler)."
            )

    # ------------------------------------------------------------------- loss scaling
    def _begin_step(self) -> None:
        """Read the loss scale once per step (None without a scaler)."""
        scaler = self.grad_scaler
        if scaler is None:
            self._scale = None
            return
        if not self._scaler_started:
            # A fresh scaler creates its scale tensor on its first scale(); do it now, so a rank
            # with nothing to scale this step (DDP) can still step and update it.
            scaler.scale(torch.zeros((), device=self._fmodel.params[0].device))
            self._scaler_started = True
        self._scale = float(scaler.get_scale())

    def _scaled(self, loss: Tensor) -> Tensor:
        # Through the scaler, which creates its scale tensor on first use.
        return loss if self.grad_scaler is None else self.grad_scaler.scale(loss)

    def _unscaled(self, grads: Sequence[Tensor | None]) -> tuple[Tensor | None, ...]:
        if self._scale is None:
            return tuple(grads)
        inverse = 1.0 / self._scale
        return tuple(None if g is None else g * inverse for g in grads)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The wrapped optimizer's parameter groups (read or change ``lr`` here).

        Learning-rate schedulers need a real optimizer: pass ``wrapper.optimizer`` to them.
        """
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of every parameter the wrapped optimizer holds."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """The wrapper's configuration, as saved in its ``state_dict``."""

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
        first_finite: Tensor | None = None,
    ) -> bool:
        """One host sync for the step: ``sentinel`` (a loss every other loss flows into) and
        every element of ``grads``. Only when that is not finite are the ``watched`` losses
        inspected, to name the first non-finite one (in the order the step computed them).

        Returns True when everything is finite. Under loss scaling it returns False for an
        overflow: the first watched loss (computed at the current parameters, before any
        scaled gradient) is finite and the scale is above 1, so a smaller scale may succeed.
        Otherwise a non-finite value raises FloatingPointError. Under DDP ``sentinel`` and
        ``first_finite`` (1 where the first watched loss is finite) come summed over the ranks,
        so every rank takes the same decision.
        """
        if _all_finite(grads, sentinel, self._fmodel.params[0].device):
            return True
        if first_finite is None and watched:
            first_finite = torch.isfinite(watched[0][1].detach()).all().float()
        if (self._scale is not None and self._scale > 1.0 and first_finite is not None
                and int(first_finite) == self._coll.world_size):
            return False
        local_first_finite = not watched or bool(torch.isfinite(watched[0][1].detach()).all())
        if (self._coll.distributed and first_finite is not None and local_first_finite
                and int(first_finite) < self._coll.world_size):
            raise FloatingPointError(
                "A loss on another rank is NaN or inf (this rank's are finite). Nothing was "
                "updated on any rank; that rank's error names the loss."
            )
        for name, value in watched:
            if not bool(torch.isfinite(value.detach()).all()):
                shown = (f"{value.detach().float().item():g}" if value.numel() == 1
                         else "a non-finite value")
                raise FloatingPointError(
                    f"The {name} is {shown}{self._on_rank()}. Nothing was updated. Check the "
                    "inputs for NaN/inf, lower the learning rates, or clip the model outputs "
                    "before the loss."
                )
        if self._coll.distributed and sentinel is not None and not bool(torch.isfinite(sentinel)):
            raise FloatingPointError(
                "A loss on another rank is NaN or inf (this rank's are finite). Nothing was "
                "updated on any rank; that rank's error names the loss."
            )
        raise FloatingPointError(
            "The gradient to apply holds NaN or inf values although the losses are finite. "
            "Nothing was updated. A differentiable Adam inner step needs eps_root > 0 "
            "(e.g. torchopt.adam(lr, eps_root=1e-8)); otherwise lower the learning rates."
        )

    def _on_rank(self) -> str:
        return f" on rank {self._coll.rank}" if self._coll.distributed else ""

    def _commit(
        self,
        grads: Sequence[Tensor | None],
        buffers: Mapping[str, Tensor],
        watched: Sequence[tuple[str, Tensor]] = (),
        sentinel: Tensor | None = None,
        grads_in_sentinel: bool = False,
    ) -> bool:
        """Synchronise ``grads`` across ranks (under DDP), check the step's losses and
        ``grads``, add ``grads`` to ``p.grad``, step the optimizer (through the scaler, if any),
        then copy ``buffers`` in. Returns whether the step was applied: False only for a
        loss-scaling overflow, after backing off the scale. ``grads_in_sentinel``: the
        sentinel is already not finite where a gradient is not, so ``grads`` need no check.

        If anything is not finite, or ``optimizer.step()`` raises, the previous gradients are
        put back and nothing else has been touched.
        """
        scaler = self.grad_scaler
        check = self.check_finite or scaler is not None
        first_finite = None
        if self._coll.distributed:
            extra = None
            if check:
                zero = torch.zeros((), device=self._fmodel.params[0].device)
                first = watched[0][1].detach() if watched else None
                extra = torch.stack([
                    sentinel.detach().sum().float() if sentinel is not None else zero,
                    torch.isfinite(first).all().float() if first is not None else zero + 1,
                ])
            grads, extra = self._coll.reduce_gradients(grads, self._fmodel.params, extra)
            if extra is not None:
                sentinel, first_finite = extra[0], extra[1]
        checked = () if grads_in_sentinel else grads
        if check and not self._check_all_finite(watched, checked, sentinel, first_finite):
            assert scaler is not None and self._scale is not None
            scaler.update(new_scale=self._scale * scaler.get_backoff_factor())
            # As GradScaler's own update after an overflow: growth counts from zero again.
            tracker = getattr(scaler, "_growth_tracker", None)
            if isinstance(tracker, Tensor):
                tracker.zero_()
            return False
        params = self._fmodel.params
        previous = [p.grad for p in params]
        try:
            for p, g in zip(params, grads):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad + g  # out of place: undoable
            if scaler is None:
                self.optimizer.step()
            else:
                scaler.step(self.optimizer)  # unscales p.grad (our new tensors) in place
                scaler.update()
        except BaseException:
            for p, old in zip(params, previous):
                p.grad = old
            if scaler is not None:
                # Same scale, and forget this step's unscale records so the next step can run.
                scaler.update(new_scale=self._scale)
            raise
        self._fmodel.commit_buffers(buffers)
        return True

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({type(self.optimizer).__name__}, {settings})"


_ONE: dict[torch.device, Tensor] = {}


def _all_finite(grads: Sequence[Tensor | None], sentinel: Tensor | None,
                device: torch.device) -> bool:
    """Whether ``sentinel`` and every element of ``grads`` are finite, with one host sync.

    The gradients go through AMP's fused finiteness check (one dispatch for the whole list, no
    reduction that could overflow); it multiplies them in place by exactly 1, which leaves
    their values as they are. The flag starts as ``sentinel * 0``: 0 when it is finite, NaN
    otherwise.
    """
    present = [g for g in grads if g is not None]
    if sentinel is not None:
        sentinel = sentinel.detach()
        if sentinel.dim() or sentinel.dtype != torch.float32:  # AMP's check takes a float32 flag
            sentinel = sentinel.sum().float()
        flag = sentinel * 0.0
    elif present:
        flag = torch.zeros((), device=device)
    else:
        return True
    if present:
        one = _ONE.get(flag.device)
        if one is None:
            one = _ONE.setdefault(flag.device, torch.ones((), device=flag.device))
        try:
            torch._amp_foreach_non_finite_check_and_unscale_(present, flag, one)
        except RuntimeError:
            # An expanded gradient (stride 0) cannot be written in place, or the gradients
            # live on several devices: fall back to their max-norms, which cannot overflow.
            norms = torch._foreach_norm(present, float("inf"))
            flag = flag + torch.stack([n.to(flag.device, torch.float32) for n in norms]).amax()
            return bool(torch.isfinite(flag))
    return float(flag) == 0.0
