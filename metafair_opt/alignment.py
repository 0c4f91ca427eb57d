"""GradientAlignmentWrapper: FaAlGrad meta-steps around a user's model and optimizer.

One step (paper section 4, equation 5): ``inner_steps`` differentiable updates
``theta_i = theta_{i-1} - inner_lr * grad L(theta_{i-1}, X_s)`` on the support set, then the
query loss ``L(theta_I, X_q)`` is differentiated with respect to the original parameters
``theta_0`` (through the inner updates, or not with ``first_order=True``), written into
``p.grad``, and the user's optimizer steps. Section 4.1 shows why this aligns the two groups'
gradients: to first order in ``inner_lr`` the meta-gradient is
``grad L_q - inner_lr * grad(grad L_q . grad L_s)``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torchopt
from torch import Tensor, nn

from metafair_opt._compiled import (
    COMPILE_FAILURES,
    check_against_eager,
    compile_failure,
    compile_method,
    raise_for_compiled_model,
)
from metafair_opt._functional import (
    Batch,
    check_same_batch_size,
    differentiable_sgd_update,
    select_rows,
)
from metafair_opt._random import replaying, rng_snapshot
from metafair_opt._second_order import recomputed_batch_norm_gradients, second_order_ops
from metafair_opt._wrapper import MetaOptimizerBase
from metafair_opt.distributed import SyncMode
from metafair_opt.splits import SplitStrategy, as_row_vector

__all__ = ["AlignmentResult", "GradientAlignmentWrapper"]

OnEmpty = Literal["fallback", "skip", "error"]

_COMPILED_MODEL_REMEDY = (
    "Pass the model uncompiled (a torch.compile'd module keeps it as ._orig_mod; one compiled "
    "in place with .compile() has to be built again without it) with compiled=True and "
    "recompute_support=False, which compiles the whole meta-step, or set first_order=True."
)


@dataclass(frozen=True)
class AlignmentResult:
    """What one :meth:`GradientAlignmentWrapper.step` did.

    ``query_loss`` is L(theta_I, X_q) (``None`` when the step was skipped); ``support_losses``
    holds L(theta_{i-1}, X_s) for each inner step; ``alignment`` is the cosine between
    grad L(theta_0, X_s) and grad L(theta_0, X_q) when the wrapper tracks it. ``fallback`` is
    True when an empty set turned the step into an ordinary one on the rows present, and
    ``skipped`` when it led to no update at all (an empty set with ``on_empty="skip"``, or a
    float16 overflow under a ``GradScaler``).
    """

    query_loss: float | None
    support_losses: list[float] = field(default_factory=list)
    n_support: int = 0
    n_query: int = 0
    fallback: bool = False
    skipped: bool = False
    alignment: float | None = None


class GradientAlignmentWrapper(MetaOptimizerBase):
    """Turns each training step into a FaAlGrad meta-step; the user's optimizer applies it.

    Args:
        model: any ``nn.Module``. It is called functionally (``torch.func.functional_call``);
            its parameters are never replaced. Parameters with ``requires_grad=False`` are left
            untouched; tied weights are handled.
        optimizer: the user's own ``torch.optim`` optimizer; it must hold every trainable
            parameter of ``model``.
        loss_fn: ``loss_fn(output, target) -> scalar tensor`` (mean-reduced), used for both the
            support and the query loss.
        inner_lr: learning rate of the default inner optimizer (differentiable SGD).
        inner_steps: number of inner updates I. ``0`` means plain training on X_q: the control
            that shows what the inner step adds.
        first_order: if True the query gradient is taken at theta_I and applied to theta_0
            without differentiating through the inner updates.
        inner_optimizer: any differentiable ``torchopt`` gradient transformation (for example
            ``torchopt.adam(1e-2, eps_root=1e-8)``; ``eps_root > 0`` is required for Adam, or
            its meta-gradients turn NaN). Its state starts fresh at every step. Default
            ``torchopt.sgd(inner_lr)``.
        track_alignment: compute ``result.alignment`` (one extra forward and backward on X_q;
            two with ``inner_steps=0``, which has no support gradient to reuse).
        on_empty: what a step does when X_s or X_q is empty: ``"fallback"`` (an ordinary step on
            the rows present, one warning per wrapper), ``"skip"`` (no update) or ``"error"``.
        check_finite: raise FloatingPointError on a NaN/inf loss or gradient (one host sync per
            step).
        grad_scaler: a ``torch.amp.GradScaler`` for float16 autocast. The wrapper scales the
            losses it differentiates, unscales the inner gradients, and calls
            ``grad_scaler.step(optimizer)`` and ``grad_scaler.update()`` itself; do not call
            them in the loop. A step that overflows is skipped (``result.skipped``, the
            parameters unchanged) and the scale backs off. bfloat16 needs no scaler.
        sync: with a ``DistributedDataParallel`` model, ``"outer"`` (each rank's meta-gradient
            on its own shard, then averaged) or ``"exact"`` (the inner gradients are summed
            across ranks too, so N ranks equal one process on the concatenated batches). See
            :mod:`metafair_opt.distributed`. Under DDP a set that is empty on any rank counts
            as empty on all (``on_empty`` applies everywhere); ``alignment`` is per rank.
        compiled: compute the meta-gradient with ``torch.func`` transforms compiled by
            ``torch.compile(fullgraph=True)`` (one graph for the inner steps, the query loss and
            the backward through both) instead of eager autograd. The first compiled step also
            runs the eager step and raises a ValueError (nothing updated) if the meta-gradients
            differ past rounding: torch.compile does not differentiate everything as eager
            autograd does (a custom ``torch.autograd.Function``'s backward is not differentiated
            again in torch 2.15). Same result up to rounding
            (dropout draws from torch's generator, as in eager mode); faster where each
            operation's fixed cost dominates (small models; the README gives the measured
            figures). The first step compiles (tens of seconds on a small MLP, minutes on a
            ResNet), a new batch size compiles once more (then with dynamic shapes); the
            default inner SGD's ``inner_lr`` is an input of the graph, so the wrappers of a
            sweep over it find their graph in torch's compile cache. Needs a C++
            compiler on CPU (Triton on CUDA); refused with ``grad_scaler`` or under DDP. Two
            differences from eager mode: a parameter the step does not reach gets a zero
            gradient instead of none (so momentum, Adam or weight decay still move it), and
            ``track_alignment`` costs two extra eager forward/backward passes, not one (with
            dropout it also draws other masks than eager mode, in another order). With
            dropout, a batch size that changes makes the trace fail in torch 2.15 (dropout under
            ``torch.func`` with dynamic shapes): the step then raises a ValueError that points
            to ``compiled=False``.
        recompute_support: trade time for memory in a second-order step. The inner steps run
            without a second-order graph (the adapted parameters theta_1..theta_I-1 are kept,
            detached), the query gradient ``v`` is taken at theta_I, and then, from the last
            inner step to the first, the support forward and backward at theta_i run once more
            (same buffers, same dropout draws) to apply ``(1 - inner_lr * H_s(theta_i))`` to
            ``v`` by one Hessian-vector product. Same meta-gradient up to rounding; the peak
            holds the support's second-order pass or the query pass, no longer both at once
            (on the benchmark's ResNet-18, 24 support and 40 query rows, from 1.56x to 1.16x
            the plain step's live tensor bytes; little gain where the support set is as large
            as the query set), for one more support forward and backward per inner step (the
            Hessian-vector product takes the place of the default's double backward; there
            about 20 % more time). Needs the default inner optimizer (SGD)
            and ``first_order=False``; refused with ``compiled=True``. No effect with
            ``inner_steps=0``. Works with ``grad_scaler``, ``track_alignment`` and DDP (under
            ``sync="exact"`` one more all-reduce per inner step).

    BatchNorm and other buffers: the inner forwards (and the alignment forward) run on a
    throw-away copy of the buffers, so they never move running statistics; the query forward
    updates them exactly once per step, and only after the step has succeeded.

    Convolutions and batch norm: in a second-order eager step the support forwards whose
    gradient is differentiated again run their ``conv1d/2d/3d`` and training-mode
    ``batch_norm`` calls through :mod:`metafair_opt._second_order` (the same values and
    derivatives, with cheaper second derivatives: on the benchmark's ResNet-18 the step took
    1.90x the plain step instead of 2.15x); used when the model holds such a module.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[Any, Any], Tensor],
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        first_order: bool = False,
        inner_optimizer: torchopt.base.GradientTransformation | None = None,
        track_alignment: bool = False,
        on_empty: OnEmpty = "fallback",
        check_finite: bool = True,
        grad_scaler: torch.amp.GradScaler | None = None,
        sync: SyncMode = "outer",
        compiled: bool = False,
        recompute_support: bool = False,
    ) -> None:
        if inner_steps < 0 or int(inner_steps) != inner_steps:
            raise ValueError(f"inner_steps must be a non-negative integer; got {inner_steps}.")
        if inner_lr < 0:
            raise ValueError(f"inner_lr must be non-negative; got {inner_lr}.")
        if on_empty not in ("fallback", "skip", "error"):
            raise ValueError(
                f"on_empty must be 'fallback', 'skip' or 'error'; got {on_empty!r}."
            )
        self._attach(model, optimizer, grad_scaler, sync)
        self.loss_fn = loss_fn
        self.inner_lr = float(inner_lr)
        self.inner_steps = int(inner_steps)
        self.first_order = bool(first_order)
        self.track_alignment = bool(track_alignment)
        self.on_empty: OnEmpty = on_empty
        self.check_finite = bool(check_finite)
        self._custom_inner = inner_optimizer is not None
        self.inner_optimizer = (
            inner_optimizer if inner_optimizer is not None else torchopt.sgd(lr=self.inner_lr)
        )
        self.step_count = 0
        self.fallback_count = 0
        self.skipped_count = 0
        self._warned_empty = False
        self._set_compiled(compiled)
        self.recompute_support = bool(recompute_support)
        if self.recompute_support and (self.first_order or self._custom_inner or self.compiled):
            clash = ("first_order=True (no second-order graph to recompute)" if self.first_order
                     else "a custom inner_optimizer (it needs the default SGD inner step)"
                     if self._custom_inner else "compiled=True")
            raise ValueError(
                f"recompute_support=True cannot be combined with {clash}. It recomputes the "
                "second-order step of the default SGD inner optimizer in eager mode: drop "
                "recompute_support, or use first_order=False, no inner_optimizer and "
                "compiled=False."
            )
        self._compiled_meta_gradient: Callable[..., Any] | None = None
        self._compiled_checked = False  # the first compiled step is compared with eager's

    # ------------------------------------------------------------------ torch.optim interface
    def config(self) -> dict[str, Any]:
        """The wrapper's configuration, as saved in :meth:`state_dict`.

        ``compiled`` and ``recompute_support`` are not part of it: they change how the step is
        computed, not what it computes."""
        return {
            "inner_lr": self.inner_lr,
            "inner_steps": self.inner_steps,
            "first_order": self.first_order,
            "track_alignment": self.track_alignment,
            "on_empty": self.on_empty,
            "custom_inner_optimizer": self._custom_inner,
        }

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state plus the wrapper's configuration and counters.

        The model's parameters are not included: save ``model.state_dict()`` beside it.
        """
        return {
            "optimizer": self.optimizer.state_dict(),
            "config": self.config(),
            "step_count": self.step_count,
            "fallback_count": self.fallback_count,
            "skipped_count": self.skipped_count,
            "warned_empty": self._warned_empty,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; warns if the saved configuration differs from this one."""
        missing = {"optimizer", "config", "step_count"} - set(state)
        if missing:
            raise KeyError(
                f"Not a GradientAlignmentWrapper state_dict: missing {sorted(missing)}."
            )
        self._warn_if_config_differs(state["config"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = int(state["step_count"])
        self.fallback_count = int(state.get("fallback_count", 0))
        self.skipped_count = int(state.get("skipped_count", 0))
        self._warned_empty = bool(state.get("warned_empty", False))

    # ------------------------------------------------------------------------------ steps
    def step(self, support: tuple[Batch, Any], query: tuple[Batch, Any]) -> AlignmentResult:
        """One meta-step on an explicit support batch ``(x_s, y_s)`` and query batch ``(x_q, y_q)``.

        Computes the meta-gradient, adds it to ``p.grad`` and calls ``optimizer.step()``.
        Call :meth:`zero_grad` first, as with any optimizer. On any error nothing changes:
        parameters, gradients, buffers and optimizer state stay as they were.
        """
        (x_s, y_s), (x_q, y_q) = _as_pair(support, "support"), _as_pair(query, "query")
        n_s = check_same_batch_size(x_s, y_s, "support x", "support y")
        n_q = check_same_batch_size(x_q, y_q, "query x", "query y")
        needs_support = self.inner_steps > 0 or self.track_alignment
        if self._coll.distributed:  # every rank must take the same branch
            counts = self._coll.gather_counts([n_s, n_q], self._fmodel.params[0].device)
            totals, smallest = counts.sum(0).tolist(), counts.min(0).values.tolist()
        else:
            totals = smallest = [n_s, n_q]
        empty = [name for name, n, needed in (("support", smallest[0], needs_support),
                                              ("query", smallest[1], True)) if needed and n == 0]
        self._begin_step()
        if empty:
            return self._empty_step(empty[0], (x_s, y_s, n_s), (x_q, y_q, n_q), totals)

        # sync="exact": each rank's mean loss weighted by its share of the global set, so the
        # gradients summed over ranks are those of the global mean.
        shares = (n_s / totals[0], n_q / totals[1]) if self._coll.exact else (1.0, 1.0)
        meta_gradient = (self._compiled_step if self.compiled
                         else self._recomputed_meta_gradient
                         if self.recompute_support and self.inner_steps
                         else self._meta_gradient)
        try:
            grads, buffers, watched, alignment = meta_gradient(x_s, y_s, x_q, y_q, shares)
        except RuntimeError as error:
            if not self.first_order:
                raise_for_compiled_model(error, type(self).__name__, _COMPILED_MODEL_REMEDY)
            raise
        applied = self._commit(grads, buffers, watched, sentinel=watched[-1][1])
        losses = torch.stack([loss.detach() for _, loss in watched]).tolist()
        return AlignmentResult(
            query_loss=losses[-1],
            support_losses=losses[: self.inner_steps],
            n_support=n_s,
            n_query=n_q,
            skipped=not applied,
            alignment=alignment,
        )

    def step_batch(
        self, x: Batch, y: Any, groups: Any, split: SplitStrategy
    ) -> AlignmentResult:
        """Split ``(x, y)`` with ``split(y, groups)`` into X_s and X_q, then :meth:`step`.

        ``groups`` holds one integer group id per row. A split with state (``Proportion``,
        ``RoundRobin``) is rewound if the step fails, so a failed step changes nothing.
        """
        n = check_same_batch_size(x, y)
        g = as_row_vector(groups, "groups")
        if g.shape[0] != n:
            raise ValueError(
                f"groups has {g.shape[0]} rows but x and y have {n}: pass one group id per row."
            )
        saved_split = copy.deepcopy(split.state_dict()) if hasattr(split, "state_dict") else None
        try:
            support_mask, query_mask = split(y, g)
            return self.step(
                support=(select_rows(x, support_mask), select_rows(y, support_mask)),
                query=(select_rows(x, query_mask), select_rows(y, query_mask)),
            )
        except Exception:
            if saved_split is not None:
                split.load_state_dict(saved_split)
            raise

    # ------------------------------------------------------------------------- internals
    def _loss(self, output: Any, target: Any, what: str) -> Tensor:
        loss = self.loss_fn(output, target)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(
                f"loss_fn must return a scalar (0-dim) tensor, but for the {what} it returned "
                f"{shape}. Reduce it (for example reduction='mean'); the wrapper needs one "
                "number per set."
            )
        return loss

    def _support_loss_name(self, i: int) -> str:
        """How errors name the support loss of inner step ``i`` (from 0)."""
        return f"support loss at inner step {i + 1} of {self.inner_steps}"

    def _inner_update(
        self, grads: tuple[Tensor, ...], state: Any, params: tuple[Tensor, ...],
        inner_lr: float | Tensor | None = None,
    ) -> tuple[tuple[Tensor, ...], Any]:
        """One inner step; ``inner_lr`` (default: the wrapper's) is the default SGD's rate."""
        if not self._custom_inner:
            # The default differentiable SGD step written directly: the same update as
            # torchopt.sgd(inner_lr), about 3x cheaper (W1's MLP: 14 against 42 us per update).
            rate = self.inner_lr if inner_lr is None else inner_lr
            return differentiable_sgd_update(params, grads, -rate), state
        updates, state = self.inner_optimizer.update(grads, state, params=params, inplace=False)
        return tuple(torchopt.apply_updates(params, updates, inplace=False)), state

    def _meta_gradient(
        self, x_s: Batch, y_s: Any, x_q: Batch, y_q: Any, shares: tuple[float, float],
        with_alignment: bool = True,
    ) -> tuple[tuple[Tensor | None, ...], dict[str, Tensor], list[tuple[str, Tensor]],
               float | None]:
        """The meta-gradient, the buffers to commit, the named losses and the alignment (with
        ``track_alignment``, unless ``with_alignment`` is False)."""
        fm = self._fmodel
        theta0 = fm.params
        scratch, committed = self._buffer_copies()

        params: tuple[Tensor, ...] = theta0
        state = self.inner_optimizer.init(params) if self._custom_inner else None
        watched: list[tuple[str, Tensor]] = []
        grad_s0: tuple[Tensor, ...] | None = None
        for i in range(self.inner_steps):
            loss_s, grads = self._support_gradient(params, scratch, x_s, y_s, shares[0], i,
                                                   create_graph=not self.first_order)
            watched.append((self._support_loss_name(i), loss_s))
            if i == 0 and self.track_alignment:
                grad_s0 = tuple(g.detach() for g in grads)
            grads = self._coll.sum_differentiable(grads)
            if self.first_order:
                # Nothing to differentiate through: the adapted parameters are fresh leaves,
                # and the query gradient at them is the meta-gradient.
                with torch.no_grad():
                    params, state = self._inner_update(grads, state, params)
                params = tuple(p.requires_grad_(True) for p in params)
            else:
                params, state = self._inner_update(grads, state, params)
            # An SGD update's graph does not save the gradients: free them before the query's
            # forward and backward (an optimizer state that keeps them, such as momentum, still
            # holds its own reference).
            del grads

        alignment = None
        if self.track_alignment and with_alignment:
            alignment = self._alignment(grad_s0, x_s, y_s, x_q, y_q, scratch)

        query_loss = self._loss(fm(params, committed, x_q), y_q, "query loss")
        watched.append(("query loss", query_loss))
        meta_grads = torch.autograd.grad(self._scaled(query_loss * shares[1]),
                                         params if self.first_order else theta0,
                                         allow_unused=True)
        return meta_grads, committed, watched, alignment

    def _buffer_copies(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Two copies of the model's buffers: ``scratch`` for the forwards whose buffer updates
        are discarded (inner steps, alignment), ``committed`` for the query forward's."""
        fm = self._fmodel
        if not fm.buffer_names:
            return {}, {}
        return fm.clone_buffers(), fm.clone_buffers()

    def _support_gradient(
        self, params: tuple[Tensor, ...], buffers: dict[str, Tensor], x_s: Batch, y_s: Any,
        share: float, i: int, create_graph: bool,
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """The support loss at ``params`` (inner step ``i``, from 0) and its unscaled gradient
        (zeros for parameters it does not reach), with a graph when ``create_graph``."""
        ops = second_order_ops(create_graph and self._second_order_ops)
        with ops:
            output = self._fmodel(params, buffers, x_s)
        loss_s = self._loss(output, y_s, self._support_loss_name(i))
        with recomputed_batch_norm_gradients(ops):
            grads = self._unscaled(torch.autograd.grad(
                self._scaled(loss_s * share), params, create_graph=create_graph,
                materialize_grads=True,
            ))
        return loss_s, grads  # type: ignore[return-value]

    def _recomputed_meta_gradient(
        self, x_s: Batch, y_s: Any, x_q: Batch, y_q: Any, shares: tuple[float, float],
    ) -> tuple[tuple[Tensor | None, ...], dict[str, Tensor], list[tuple[str, Tensor]],
               float | None]:
        """:meth:`_meta_gradient`'s results (second order, SGD inner steps) by recomputation:
        ``d L_q(theta_I) / d theta_0 = prod_i (1 - inner_lr * H_s(theta_i)) v`` with
        ``v = grad L_q(theta_I)``, the transposed product applied from ``i = I - 1`` down to 0
        (one vector-Hessian product each), on a support forward and backward run again with
        the buffers and random state of its first run.

        Under ``sync="exact"`` the inner gradients are sums over ranks, so each Hessian is too:
        the vector it is applied to is summed over ranks first (as ``v``), and each rank
        returns its own share of the product, which the commit's sum over ranks completes.
        """
        fm = self._fmodel
        theta0 = fm.params
        device = theta0[0].device
        scratch, committed = self._buffer_copies()

        # First pass: the inner steps without a second-order graph; what each support forward
        # saw (parameters, buffers, random state) is kept to run it again.
        params: tuple[Tensor, ...] = theta0
        replay: list[tuple[tuple[Tensor, ...], dict[str, Tensor], Any]] = []
        watched: list[tuple[str, Tensor]] = []
        grad_s0: tuple[Tensor, ...] | None = None
        for i in range(self.inner_steps):
            replay.append((params, {n: b.clone() for n, b in scratch.items()},
                           rng_snapshot(device)))
            loss_s, grads = self._support_gradient(params, scratch, x_s, y_s, shares[0], i,
                                                   create_graph=False)
            watched.append((self._support_loss_name(i), loss_s.detach()))
            if i == 0 and self.track_alignment:
                grad_s0 = grads
            grads = self._coll.sum_differentiable(grads)
            with torch.no_grad():
                params = differentiable_sgd_update(params, grads, -self.inner_lr)
            params = tuple(p.requires_grad_(True) for p in params)
            del grads

        alignment = None
        if self.track_alignment:
            alignment = self._alignment(grad_s0, x_s, y_s, x_q, y_q, scratch)

        query_loss = self._loss(fm(params, committed, x_q), y_q, "query loss")
        own = list(torch.autograd.grad(self._scaled(query_loss * shares[1]), params,
                                       allow_unused=True))
        # Only the value is kept: the spent graph's nodes would hold theta_I alive.
        watched.append(("query loss", query_loss.detach()))
        del params, query_loss
        reached = [g is not None for g in own]
        own = [torch.zeros_like(p) if g is None else g for g, p in zip(own, theta0)]
        # Without "exact" this rank's product is the whole of it: the vector is `own` itself
        # (the same list, so each entry replaced below frees the one before it).
        vector = list(self._coll.sum_differentiable(own)) if self._coll.exact else own

        # Reverse sweep: vector <- vector - inner_lr * H_s(theta_i) vector.
        for i in reversed(range(self.inner_steps)):
            at, buffers, rng = replay.pop()
            with replaying(rng):
                _, grads = self._support_gradient(at, buffers, x_s, y_s, shares[0], i,
                                                  create_graph=True)
            graph = [(g, v) for g, v in zip(grads, vector) if g.requires_grad]
            if not graph:  # the support gradient does not depend on the parameters
                continue
            hvp = list(torch.autograd.grad([g for g, _ in graph], at,
                                           grad_outputs=[v for _, v in graph],
                                           allow_unused=True))
            del grads, graph
            if self._coll.exact and i > 0:
                summed = self._coll.sum_differentiable(
                    [torch.zeros_like(v) if h is None else h for h, v in zip(hvp, vector)])
                vector = [v - self.inner_lr * h for v, h in zip(vector, summed)]
                del summed
            for k, h in enumerate(hvp):
                if h is not None:
                    reached[k] = True
                    own[k] = own[k] - self.inner_lr * h
                    hvp[k] = None
        meta_grads = tuple(g.detach() if r else None for g, r in zip(own, reached))
        return meta_grads, committed, watched, alignment

    def _compiled_step(
        self, x_s: Batch, y_s: Any, x_q: Batch, y_q: Any, shares: tuple[float, float]
    ) -> tuple[tuple[Tensor | None, ...], dict[str, Tensor], list[tuple[str, Tensor]],
               float | None]:
        """:meth:`_meta_gradient`'s results, computed by the compiled ``torch.func`` form."""
        fm = self._fmodel
        scratch, committed = self._buffer_copies()
        if self._compiled_meta_gradient is None:
            self._compiled_meta_gradient = compile_method(self._functional_meta_gradient)
        theta0 = tuple(p.detach() for p in fm.params)
        # The inner rate as a tensor, as the reweighter's rates: a float would be baked into the
        # graph, and the wrappers of a sweep over inner_lr would each compile their own instead
        # of finding one in torch's cache.
        inner_lr = torch.tensor(self.inner_lr, device=theta0[0].device,
                                dtype=torch.promote_types(theta0[0].dtype, torch.float32))
        before = rng_snapshot(theta0[0].device) if not self._compiled_checked else None
        try:
            meta_grads, losses = self._compiled_meta_gradient(
                theta0, scratch, committed, x_s, y_s, x_q, y_q, inner_lr)
        except COMPILE_FAILURES as error:
            # A trace that stops on an exception reports only "Observed exception": take the
            # eager step (on fresh buffer copies, nothing committed), so that a bad input raises
            # the eager step's own error; if it runs, torch.compile could not handle the step.
            with replaying(rng_snapshot(theta0[0].device)):  # and draws nothing
                self._meta_gradient(x_s, y_s, x_q, y_q, shares)
            raise compile_failure(error, type(self).__name__) from error
        if before is not None:
            # The first compiled step is checked against the eager one (without the alignment,
            # which the compiled step computes afterwards, so the dropout draws stay aligned).
            self._compiled_checked = check_against_eager(
                [meta_grads],
                lambda: [self._meta_gradient(x_s, y_s, x_q, y_q, shares,
                                             with_alignment=False)[0]],
                before, "meta-gradient", type(self).__name__)
        names = [*map(self._support_loss_name, range(self.inner_steps)), "query loss"]
        alignment = (self._alignment(None, x_s, y_s, x_q, y_q, scratch)
                     if self.track_alignment else None)
        return tuple(meta_grads), committed, list(zip(names, losses)), alignment

    def _functional_meta_gradient(
        self, theta0: tuple[Tensor, ...], scratch: dict[str, Tensor],
        committed: dict[str, Tensor], x_s: Batch, y_s: Any, x_q: Batch, y_q: Any,
        inner_lr: Tensor,
    ) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """The meta-gradient at ``theta0`` and the step's losses (support losses, then the
        query loss), written with ``torch.func.grad`` so that ``torch.compile`` can trace the
        whole of it, double backward included; ``inner_lr`` is the default inner SGD's rate
        (0-dim)."""
        fm = self._fmodel

        # The buffers are arguments, not captured: torch.func refuses in-place updates (running
        # statistics) of tensors a transformed function closes over.
        def support_loss(params: tuple[Tensor, ...], buffers: dict[str, Tensor],
                         what: str) -> Tensor:
            return self._loss(fm.call_at(params, buffers, x_s), y_s, what)

        def query_loss(theta: tuple[Tensor, ...], scratch: dict[str, Tensor],
                       committed: dict[str, Tensor]) -> tuple[Tensor, tuple[Tensor, ...]]:
            params = theta
            state = self.inner_optimizer.init(params) if self._custom_inner else None
            losses = []
            for i in range(self.inner_steps):
                what = self._support_loss_name(i)
                grads, loss_s = torch.func.grad_and_value(support_loss)(params, scratch, what)
                if self.first_order:  # the query gradient at theta_I, applied to theta_0
                    grads = tuple(g.detach() for g in grads)
                params, state = self._inner_update(grads, state, params, inner_lr)
                losses.append(loss_s)
            if self.first_order and self.inner_steps:
                # theta_I's value, with the identity as its derivative in theta_0 (an update
                # such as weight decay depends on the parameters themselves).
                params = tuple(p.detach() + (t - t.detach()) for p, t in zip(params, theta))
            loss_q = self._loss(fm.call_at(params, committed, x_q), y_q, "query loss")
            return loss_q, (*losses, loss_q)

        return torch.func.grad(query_loss, has_aux=True)(theta0, scratch, committed)

    def _alignment(
        self,
        grad_s0: tuple[Tensor, ...] | None,
        x_s: Batch,
        y_s: Any,
        x_q: Batch,
        y_q: Any,
        scratch: dict[str, Tensor],
    ) -> float:
        fm = self._fmodel
        if grad_s0 is None:
            loss_s = self._loss(fm(fm.params, scratch, x_s), y_s, "support loss (alignment)")
            grad_s0 = torch.autograd.grad(self._scaled(loss_s), fm.params,
                                          materialize_grads=True)
        loss_q = self._loss(fm(fm.params, scratch, x_q), y_q, "query loss (alignment)")
        # Scaled against float16 underflow; the cosine does not depend on either scale.
        grad_q0 = torch.autograd.grad(self._scaled(loss_q), fm.params, materialize_grads=True)
        return _cosine(grad_s0, grad_q0)

    def _commit(
        self,
        grads: Sequence[Tensor | None],
        buffers: Mapping[str, Tensor],
        watched: Sequence[tuple[str, Tensor]] = (),
        sentinel: Tensor | None = None,
    ) -> bool:
        applied = super()._commit(grads, buffers, watched, sentinel)
        if applied:
            self.step_count += 1
        else:
            self.skipped_count += 1
        return applied

    def _empty_step(
        self, which: str, support: tuple[Batch, Any, int], query: tuple[Batch, Any, int],
        totals: list[int],
    ) -> AlignmentResult:
        n_s, n_q = support[2], query[2]
        if self.on_empty == "error" or (totals[0] == 0 and totals[1] == 0):
            where = (" on at least one rank" if self._coll.distributed else "")
            raise ValueError(
                f"The {which} set is empty in this batch{where} ({n_s} support rows, {n_q} "
                f"query rows{self._on_rank()}). Sample batches that hold every group, for "
                "example with "
                "metafair_opt.GroupBalancedBatchSampler, or build the wrapper with "
                "on_empty='fallback' or 'skip'."
            )
        if self.on_empty == "skip":
            self.skipped_count += 1
            return AlignmentResult(query_loss=None, n_support=n_s, n_query=n_q, skipped=True)
        if not self._warned_empty:
            warnings.warn(
                f"The {which} set was empty in a batch, so this step was an ordinary training "
                "step on the rows present (result.fallback=True). This warning is shown once "
                "per wrapper; use metafair_opt.GroupBalancedBatchSampler to avoid empty sets.",
                RuntimeWarning,
                stacklevel=3,
            )
        # The rows present: the query set where any rank has one, else the support set.
        use_query = totals[1] > 0
        x, y, n = query if use_query else support
        total = totals[1] if use_query else totals[0]
        fm = self._fmodel
        committed = fm.clone_buffers() if fm.buffer_names else {}
        what = f"fallback loss ({which} set empty)"
        self._warned_empty = True
        loss: Tensor | None = None
        watched: list[tuple[str, Tensor]] = []
        if n == 0:  # only under DDP: this rank has no rows to contribute
            grads: tuple[Tensor | None, ...] = tuple(torch.zeros_like(p) for p in fm.params)
        else:
            loss = self._loss(fm(fm.params, committed, x), y, what)
            share = n / total if self._coll.exact else 1.0
            grads = torch.autograd.grad(self._scaled(loss * share), fm.params,
                                        allow_unused=True)
            watched = [(what, loss)]
        applied = self._commit(grads, committed, watched, sentinel=loss)
        self.fallback_count += int(applied)
        return AlignmentResult(
            query_loss=None if loss is None else float(loss.detach()), n_support=n_s,
            n_query=n_q, fallback=applied, skipped=not applied,
        )


def _as_pair(pair: Any, name: str) -> tuple[Batch, Any]:
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(f"{name} must be a pair (x, y); got {type(pair).__name__}.")
    return pair[0], pair[1]


def _cosine(a: tuple[Tensor, ...], b: tuple[Tensor, ...]) -> float:
    with torch.no_grad():
        dot = sum((x * y).sum() for x, y in zip(a, b))
        na = torch.sqrt(sum((x * x).sum() for x in a))
        nb = torch.sqrt(sum((y * y).sum() for y in b))
        return float(dot / (na * nb).clamp_min(torch.finfo(na.dtype).tiny))
