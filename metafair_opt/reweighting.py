"""SampleReweighter: FORML's learned per-sample weights (Algorithm 1 of the FORML paper).

One step on a training batch (indices ``idx`` into a global weight table ``w``) and a
group-balanced validation batch:

1. per-sample losses ``l_i`` at the current parameters theta; weighted loss
   ``sum_i softmax(w[idx])_i * l_i`` (a fresh table gives the plain mean loss);
2. a differentiable look-ahead ``theta~ = theta - lookahead_lr * grad`` (the update of torchopt's
   functional SGD, written directly; ``reverse_lookahead=True`` flips the sign, appendix 7.1);
3. the fairness meta-loss on the validation batch at theta~, differentiated with respect to
   ``w[idx]``;
4. the weight update on those table rows (SGD or lazily-initialised per-row Adam);
5. the real update: the weighted loss under the new weights, at the original theta, through the
   user's optimizer. The training forward of step 1 serves both gradients (with
   ``recompute_forward=True`` it is run again for this one instead of kept).

Why Adam on the weights by default: the meta-gradient on one weight is about
``lookahead_lr * <grad of the meta-loss, grad of that sample's loss> / batch size``, tiny and
dependent on the model, the loss scale and the batch size. Plain SGD with the paper's setting
(weight_lr equal to the model's, 1e-3) leaves the weights within 0.1 % of uniform. Adam divides
by the running gradient magnitude per row, so ``weight_lr`` is the step in logit units per visit
of a sample whatever the scale: a weight can move by about ``weight_lr`` each time its sample is
seen.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import pandas as pd
import torch
import torch.autograd.forward_ad as fwad
from torch import Tensor, nn

from metafair_opt._compiled import (
    COMPILE_FAILURES,
    check_against_eager,
    compile_failure,
    compile_method,
    raise_for_compiled_model,
)
from metafair_opt._forward_replay import PrimalRecord, recording_primals, replaying_primals
from metafair_opt._functional import (
    Batch,
    batch_size,
    check_same_batch_size,
    differentiable_sgd_update,
)
from metafair_opt._random import RngSnapshot, replaying, rng_snapshot
from metafair_opt._recomputed_activations import RecomputedActivations, has_batch_norm
from metafair_opt._second_order import recomputed_batch_norm_gradients, second_order_ops
from metafair_opt._wrapper import MetaOptimizerBase
from metafair_opt.distributed import SyncMode
from metafair_opt.meta_losses import MetaLoss, group_mean_losses, resolve_meta_loss
from metafair_opt.splits import as_row_vector

__all__ = ["ReweightResult", "SampleReweighter"]

WeightOptimizer = Literal["adam", "sgd"]
WeightGradMode = Literal["auto", "reverse", "forward"]

#: ``weight_grad_mode="auto"`` takes the forward mode from this many trainable parameter
#: elements on: below it the per-operation cost of a forward-mode pass outweighs what it saves.
FORWARD_MODE_MIN_PARAMETERS = 1_000_000


@dataclass(frozen=True)
class ReweightResult:
    """What one :meth:`SampleReweighter.step` did.

    ``loss`` is the weighted training loss under the new weights (the one the model was updated
    with); ``meta_loss`` the fairness meta-loss on the validation batch at the look-ahead
    parameters; ``batch_weights`` the normalised weights used, scaled so that uniform weighting
    is 1 for every row (``loss = mean(batch_weights * per-sample losses)``); ``group_losses``
    the mean validation loss of each group at the look-ahead parameters. ``skipped`` is True
    when a float16 overflow under a ``GradScaler`` left everything unchanged but the scale.
    """

    loss: float
    meta_loss: float
    batch_weights: Tensor
    group_losses: dict[int, float] = field(default_factory=dict)
    skipped: bool = False


class SampleReweighter(MetaOptimizerBase):
    """Learns one weight per training example for fairness (FORML) around the user's optimizer.

    Args:
        model: any ``nn.Module``; called functionally, its parameters are never replaced.
        optimizer: the user's own ``torch.optim`` optimizer holding every trainable parameter.
        num_samples: size of the training set; the weight table has one row per example.
        loss_fn: ``loss_fn(output, target, reduction="none") -> (batch,)`` per-sample losses,
            e.g. ``F.cross_entropy``.
        meta_loss: ``"mean_loss_discrepancy"``, ``"max_loss_discrepancy"``, ``"cross_entropy"``
            or a callable ``(losses, groups) -> scalar`` evaluated on the validation batch.
        weight_lr: learning rate of the weight update. With Adam it is roughly how far (in
            logits) a weight moves each time its example is seen, so choose it from the number
            of epochs: about 0.01-0.05 for tens of epochs, 0.001 for hundreds.
        weight_optimizer: ``"adam"`` (default; per-row state created lazily, bias-corrected per
            row) or ``"sgd"`` (the paper's plain gradient step).
        lookahead_lr: step size of the look-ahead; ``None`` uses the optimizer's current
            learning rate (``param_groups[0]["lr"]``) at every step.
        reverse_lookahead: take the look-ahead step up the gradient (appendix 7.1).
        ema_decay: decay of the per-example moving average of the normalised weighted loss
            used by :meth:`prune` and :meth:`keep_indices`.
        weight_device: where the table lives (default: the model's device; ``"cpu"`` for very
            large data sets). A step reads and writes only the batch's rows. The table is
            float64 for a float64 model and float32 otherwise.
        adam_betas, adam_eps: Adam's constants for ``weight_optimizer="adam"``.
        check_finite: raise FloatingPointError on a NaN/inf loss or meta-gradient.
        meta_every: update the weights on every ``meta_every``-th step only (counting from the
            first); the steps in between are plain weighted steps with the current weights and
            do not need a validation batch (``val=None`` is accepted there).
        grad_scaler: a ``torch.amp.GradScaler`` for float16 autocast. The reweighter scales the
            losses it differentiates (look-ahead, meta-loss, final loss), unscales the
            gradients it uses itself, and calls ``grad_scaler.step(optimizer)`` and
            ``grad_scaler.update()``; do not call them in the loop. A step that overflows
            changes nothing but the scale (``result.skipped``; the same step, with its
            weight update, is retried on the next batch). bfloat16 needs no scaler.
        sync: with a ``DistributedDataParallel`` model, ``"outer"`` (each rank's look-ahead,
            meta-loss and softmax on its own shard; weight gradients exchanged, final gradients
            averaged) or ``"exact"`` (the look-ahead gradient, softmax and meta-loss taken over
            every rank's batch, so N ranks equal one process on the concatenated batches).
            Either way the weight table is the same on every rank after every step. See
            :mod:`metafair_opt.distributed`.
        weight_grad_mode: how the meta-loss's gradient on the batch's weights is computed; the
            result is the same up to rounding. ``"reverse"`` back-propagates through the
            look-ahead (its gradient is built with ``create_graph=True``, then differentiated
            again; a model's convolutions and training-mode batch norm take the cheaper second
            derivatives of :mod:`metafair_opt._second_order` there); ``"forward"`` takes the
            meta-loss's gradient ``v`` at the look-ahead parameters and one forward-mode pass
            (``torch.autograd.forward_ad``) of the training losses along ``v``, with no
            second-order graph: less memory, and faster on large models, but slower on small
            ones where each operation's fixed cost dominates (that pass takes the training
            forward's convolution outputs as its primal values instead of computing them again,
            see :mod:`metafair_opt._forward_replay`). On a model with batch norm the training
            and validation graphs save batch norm, in-place ReLU and residual-sum outputs as
            recipes computed again when needed, to the bit
            (:mod:`metafair_opt._recomputed_activations`; on the benchmark's ResNet-18 the
            step's peak of live tensors fell from 2.20x to 1.46x the plain step's for about 2 %
            more time). The model and loss must support forward-mode AD (every built-in layer
            does); random draws such as dropout are replayed, so both modes see the same
            losses; under float16 autocast the forward-mode pass runs in float32 (forward mode
            has no loss scaling).
            ``"auto"`` takes ``"forward"`` from ``FORWARD_MODE_MIN_PARAMETERS`` trainable
            parameter elements on.
        recompute_forward: on weight-updating steps, free the training forward's graph as soon
            as the look-ahead gradient is taken and run the training forward once more (same
            buffers and random draws) for the final gradient: the step's peak then holds one
            batch's saved activations instead of the training and the validation batch's
            together (on the benchmark's ResNet-18 from 1.46x to 1.00x the plain step's peak
            of live tensors), for one more forward's time (there 18 % more in the last full
            run). Needs the forward-mode weight gradient (with ``weight_grad_mode="auto"`` it
            takes it whatever the model's size; refused with ``"reverse"``, whose second-order
            graph holds the training forward anyway, and with ``compiled=True``).
        compiled: compute each weight-updating step with ``torch.func`` transforms compiled by
            ``torch.compile(fullgraph=True)``: one graph for the training forward, the
            look-ahead, the validation loss, the weight gradient and update, and the final
            gradient. The first compiled step also runs the eager step and raises a ValueError
            (nothing updated) if the weight or final gradients differ past rounding (a custom
            ``torch.autograd.Function``'s backward is not differentiated again by torch.compile
            in torch 2.15). Same result up to rounding (dropout draws from torch's generator as
            in eager mode); faster where each operation's fixed cost dominates (small models; the
            README gives the measured figures). The weight gradient is taken in reverse mode
            (``weight_grad_mode`` must be ``"auto"`` or ``"reverse"``), through the pullback
            of the one training forward. The first step compiles (about 10 s on a small MLP);
            a new training or validation batch size, a first batch with repeated indices, the
            first step with Adam state and a switch between train and eval mode each compile
            once more (torch.compile allows 8 variants, ``torch._dynamo.config.recompile_limit``).
            Needs a C++ compiler on CPU (Triton on CUDA); refused with ``grad_scaler`` or under
            DDP. The plain weighted steps between weight updates (``meta_every > 1``) stay
            eager. A parameter the step does not reach gets a zero gradient instead of none
            (so momentum, Adam or weight decay still move it, unlike in eager mode).
            A step torch.compile cannot trace raises a ValueError that points to
            ``compiled=False`` and changes nothing; in torch 2.15 that happens with dropout
            and a batch size that changes (dropout under ``torch.func`` with dynamic shapes).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        num_samples: int,
        loss_fn: Callable[..., Tensor],
        meta_loss: str | MetaLoss = "mean_loss_discrepancy",
        weight_lr: float = 0.01,
        weight_optimizer: WeightOptimizer = "adam",
        lookahead_lr: float | None = None,
        reverse_lookahead: bool = False,
        ema_decay: float = 0.9,
        weight_device: torch.device | str | None = None,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        check_finite: bool = True,
        meta_every: int = 1,
        grad_scaler: torch.amp.GradScaler | None = None,
        sync: SyncMode = "outer",
        weight_grad_mode: WeightGradMode = "auto",
        compiled: bool = False,
        recompute_forward: bool = False,
    ) -> None:
        if int(num_samples) != num_samples or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer; got {num_samples}.")
        if weight_optimizer not in ("adam", "sgd"):
            raise ValueError(f"weight_optimizer must be 'adam' or 'sgd'; got {weight_optimizer!r}.")
        if weight_lr < 0:
            raise ValueError(f"weight_lr must be non-negative; got {weight_lr}.")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1); got {ema_decay}.")
        if weight_grad_mode not in ("auto", "reverse", "forward"):
            raise ValueError(
                f"weight_grad_mode must be 'auto', 'reverse' or 'forward'; got "
                f"{weight_grad_mode!r}."
            )
        self._attach(model, optimizer, grad_scaler, sync)
        self._set_compiled(compiled)
        if self.compiled and weight_grad_mode == "forward":
            raise ValueError(
                "compiled=True takes the weight gradient in reverse mode; use "
                "weight_grad_mode='auto' or 'reverse' with it, or compiled=False for the "
                "forward mode."
            )
        self.recompute_forward = bool(recompute_forward)
        if self.recompute_forward and (self.compiled or weight_grad_mode == "reverse"):
            raise ValueError(
                "recompute_forward=True frees the training graph between the forward-mode "
                "weight gradient's passes; the reverse mode (weight_grad_mode='reverse', and "
                "compiled=True) needs that graph until the weight gradient is taken. Use "
                "weight_grad_mode='auto' or 'forward' with compiled=False, or "
                "recompute_forward=False."
            )
        self._compiled_meta_step: Callable[..., Any] | None = None
        self._compiled_checked = False  # the first compiled step is compared with eager's
        self.weight_grad_mode: WeightGradMode = weight_grad_mode
        size = sum(p.numel() for p in self._fmodel.params)
        self._batch_norm = has_batch_norm(self._fmodel.module)
        self._forward_mode = not self.compiled and (
            weight_grad_mode == "forward" or self.recompute_forward
            or (weight_grad_mode == "auto" and size >= FORWARD_MODE_MIN_PARAMETERS))
        self.num_samples = int(num_samples)
        self.loss_fn = loss_fn
        (self._meta_loss_fn, self._needs_groups, self.meta_loss_name,
         self._meta_from_means) = resolve_meta_loss(meta_loss)
        self.weight_lr = float(weight_lr)
        self.weight_optimizer: WeightOptimizer = weight_optimizer
        self.lookahead_lr = lookahead_lr
        self.reverse_lookahead = bool(reverse_lookahead)
        self.ema_decay = float(ema_decay)
        self.adam_betas = (float(adam_betas[0]), float(adam_betas[1]))
        self.adam_eps = float(adam_eps)
        self.check_finite = bool(check_finite)
        if int(meta_every) != meta_every or meta_every < 1:
            raise ValueError(f"meta_every must be a positive integer; got {meta_every}.")
        self.meta_every = int(meta_every)
        device = torch.device(weight_device) if weight_device is not None else (
            self._fmodel.params[0].device
        )
        # float64 models get a float64 table; low-precision ones keep float32 weights.
        dtype = torch.float64 if self._fmodel.params[0].dtype == torch.float64 else torch.float32
        # One row per example: (weight logit, moving average, times seen), so that a step reads
        # and writes each batch row once. Counts are exact integers up to 2**24 in float32.
        self._rows = torch.zeros(self.num_samples, 3, device=device, dtype=dtype)
        self._rows[:, _EMA] = float("nan")
        # Adam's per-row (exp_avg, exp_avg_sq, steps), created on the first Adam update.
        self._adam: Tensor | None = None
        self.step_count = 0
        self.skipped_count = 0

    # ------------------------------------------------------------------ torch.optim interface
    def config(self) -> dict[str, Any]:
        """The reweighter's configuration, as saved in :meth:`state_dict`.

        ``weight_grad_mode``, ``compiled`` and ``recompute_forward`` are not part of it: every
        mode computes the same step, so a run may resume under any.
        """
        return {
            "num_samples": self.num_samples,
            "meta_loss": self.meta_loss_name,
            "weight_lr": self.weight_lr,
            "weight_optimizer": self.weight_optimizer,
            "lookahead_lr": self.lookahead_lr,
            "reverse_lookahead": self.reverse_lookahead,
            "ema_decay": self.ema_decay,
            "adam_betas": self.adam_betas,
            "adam_eps": self.adam_eps,
            "meta_every": self.meta_every,
        }

    def state_dict(self) -> dict[str, Any]:
        """Optimizer state, weight table, weight-optimizer state, EMA table and counters."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "config": self.config(),
            "weights": self._rows[:, _WEIGHT].clone(),
            "ema": self._rows[:, _EMA].clone(),
            "seen": self._rows[:, _SEEN].long(),
            "adam": None if self._adam is None else {
                "exp_avg": self._adam[:, 0].clone(),
                "exp_avg_sq": self._adam[:, 1].clone(),
                "steps": self._adam[:, 2].long(),
            },
            "step_count": self.step_count,
            "skipped_count": self.skipped_count,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the table size must match ``num_samples``."""
        missing = {"optimizer", "weights", "ema", "seen", "step_count"} - set(state)
        if missing:
            raise KeyError(f"Not a SampleReweighter state_dict: missing {sorted(missing)}.")
        if state["weights"].numel() != self.num_samples:
            raise ValueError(
                f"The saved weight table has {state['weights'].numel()} rows but this "
                f"reweighter has num_samples={self.num_samples}."
            )
        self._warn_if_config_differs(state.get("config", {}))
        self.optimizer.load_state_dict(state["optimizer"])
        like = self._rows
        self._rows = _packed(like, state["weights"], state["ema"], state["seen"])
        adam = state.get("adam")
        self._adam = None if adam is None else _packed(
            like, adam["exp_avg"], adam["exp_avg_sq"], adam["steps"])
        self.step_count = int(state["step_count"])
        self.skipped_count = int(state.get("skipped_count", 0))

    # -------------------------------------------------------------------------- inspection
    @property
    def weights(self) -> Tensor:
        """A copy of the raw weight table (logits; softmax-normalised per batch when used)."""
        return self._rows[:, _WEIGHT].clone()

    @property
    def _table(self) -> Tensor:
        # The weight column, a view: writing into it changes the weights.
        return self._rows[:, _WEIGHT]

    def to_frame(self) -> pd.DataFrame:
        """One row per training example: index, weight, ema_weighted_loss, times_seen.

        ``ema_weighted_loss`` is the moving average of the example's normalised weighted loss
        (``batch_weight * loss``, uniform weighting = the loss itself); NaN until first seen.
        """
        return pd.DataFrame(
            {
                "index": torch.arange(self.num_samples).numpy(),
                "weight": self._rows[:, _WEIGHT].cpu().numpy(),
                "ema_weighted_loss": self._rows[:, _EMA].cpu().numpy(),
                "times_seen": self._rows[:, _SEEN].long().cpu().numpy(),
            }
        )

    def prune(self, n: int) -> Tensor:
        """The ``n`` example indices with the lowest moving average of normalised weighted loss.

        Only examples seen at least once are candidates (FORML section 4.5). Returned in order,
        lowest first.
        """
        seen = torch.nonzero(self._rows[:, _SEEN] > 0).flatten()
        if not 0 <= n <= seen.numel():
            raise ValueError(
                f"Cannot prune {n} examples: {seen.numel()} of {self.num_samples} have been seen "
                "in training so far (n must lie in [0, seen])."
            )
        order = torch.argsort(self._rows[seen, _EMA], stable=True)
        return seen[order[:n]].cpu()

    def keep_indices(self, fraction: float) -> Tensor:
        """Sorted indices of the examples to keep when keeping ``fraction`` of the data set.

        Drops the ``round((1 - fraction) * num_samples)`` examples that :meth:`prune` ranks
        lowest; unseen examples are always kept. Use with ``torch.utils.data.Subset``.
        """
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must lie in (0, 1]; got {fraction}.")
        drop = self.prune(min(round((1.0 - fraction) * self.num_samples),
                              int((self._rows[:, _SEEN] > 0).sum())))
        keep = torch.ones(self.num_samples, dtype=torch.bool)
        keep[drop] = False
        return torch.nonzero(keep).flatten()

    # ------------------------------------------------------------------------------- step
    def step(
        self, x: Batch, y: Any, idx: Any, val: tuple[Batch, Any, Any] | None
    ) -> ReweightResult:
        """One FORML step on training rows ``(x, y)`` with table rows ``idx``, then the update.

        ``val`` is a validation batch ``(x_val, y_val, groups_val)`` (unused, and may be None,
        on the steps between weight updates when ``meta_every > 1``). Call :meth:`zero_grad`
        first, as with any optimizer. On any error nothing changes: parameters, gradients,
        buffers, optimizer state, weight table, Adam and EMA tables stay as they were.
        """
        n = check_same_batch_size(x, y)
        idx = self._checked_indices(idx, n)
        coll = self._coll
        # The sorted table rows and each sample's position among them; None without repeats.
        unique_rows: tuple[Tensor, Tensor] | None = None
        if not coll.distributed:  # under DDP _check_shards checks the range, on every rank alike
            unique_rows = self._checked_repeats(idx)
        self._begin_step()
        meta_step = self.step_count % self.meta_every == 0
        validation: tuple[Batch, Any, Tensor] | None = None
        if meta_step:
            if val is None:
                raise TypeError("val must be a validation batch (x_val, y_val, groups_val).")
            validation = self._checked_validation(val)

        n_global = n  # the rows one softmax normalises over: every rank's under sync="exact"
        if coll.distributed:  # checked on every rank alike, before any other collective
            total = self._check_shards(n, validation, idx)
            n_global = total if coll.exact else n
            idx_all = coll.gather(idx.to(self._fmodel.params[0].device)).to(idx.device)
            unique_rows = torch.unique(idx_all, return_inverse=True)
            if unique_rows[0].numel() == idx_all.numel():
                unique_rows = None  # the unused inverse: one index per sample, live all step
        else:
            idx_all = idx
        # rows: the table rows of the whole batch (every rank's under DDP); inverse: this
        # rank's samples' positions among them.
        all_inverse: Tensor | None
        inverse: Tensor | slice | None
        if unique_rows is None:
            # No repeats (the usual case): address the table in batch order, so this rank's
            # samples are the rows themselves (a slice of them under DDP) and no gather enters
            # the autograd graph.
            rows, all_inverse = idx_all, None
            inverse = None if coll.world_size == 1 else slice(coll.rank * n, (coll.rank + 1) * n)
        else:
            rows, all_inverse = unique_rows
            inverse = all_inverse[coll.rank * n:(coll.rank + 1) * n].to(
                self._fmodel.params[0].device)
        block = self._rows[rows]  # the batch's (weight, moving average, count), read once
        adam_state = (self._adam[rows] if meta_step and self._adam is not None
                      and self.weight_optimizer == "adam" else None)
        try:
            if validation is not None and self.compiled:
                out = self._compiled_outcome(x, y, block, inverse, adam_state, validation)
            else:
                out = self._eager_outcome(x, y, block, inverse, all_inverse, adam_state,
                                          validation, n_global)
        except RuntimeError as error:
            # The forward mode differentiates no backward: torch's advice on donated buffers
            # (the graph it keeps for the final gradient) is the right one there.
            if validation is not None and not self._forward_mode:
                raise_for_compiled_model(error, type(self).__name__, _COMPILED_MODEL_REMEDY)
            raise

        # Everything was computed without side effects, the tables' new values on the table's
        # device included; the optimizer step comes first because it is the one part that can
        # still fail (and then puts the old gradients back).
        new_block = out.new_block.to(self._rows.device)
        adam_update: tuple[Tensor, Tensor] | None = None
        if out.adam_rows is not None:
            # Created lazily (rows never updated keep zero state), and stored only on success.
            table = self._adam if self._adam is not None else torch.zeros_like(self._rows)
            adam_update = (table, out.adam_rows.to(self._rows.device))
        if not self._commit(out.final_grads, out.committed, out.watched, sentinel=out.sentinel,
                            grads_in_sentinel=out.grads_in_sentinel):
            self.skipped_count += 1
            return ReweightResult(loss=float(out.final_loss), meta_loss=float("nan"),
                                  batch_weights=out.batch_weights.cpu(), skipped=True)
        if adam_update is not None:
            table, values = adam_update
            table[rows] = values
            self._adam = table
        self._rows[rows] = new_block
        self.step_count += 1
        group_losses: dict[int, float] = {}
        meta_value = float("nan")
        if out.meta is not None:
            group_losses = dict(zip(out.group_ids.tolist(), out.group_means.tolist()))
            meta_value = float(out.meta)
        return ReweightResult(
            loss=float(out.final_loss),
            meta_loss=meta_value,
            batch_weights=out.batch_weights.cpu(),
            group_losses=group_losses,
        )

    def _eager_outcome(
        self, x: Batch, y: Any, block: Tensor, inverse: Tensor | slice | None,
        all_inverse: Tensor | None, adam_state: Tensor | None,
        validation: tuple[Batch, Any, Tensor] | None, n_global: int,
    ) -> _Outcome:
        """The step in eager autograd: one training forward serves the look-ahead gradient
        (on a meta step) and the final weighted gradient, unless ``recompute_forward`` has it
        run again for the final one."""
        fm, coll = self._fmodel, self._coll
        committed = fm.clone_buffers() if fm.buffer_names else {}
        theta = fm.params
        forward_meta_step = validation is not None and self._forward_mode
        rng = rng_snapshot(theta[0].device) if forward_meta_step else None
        # The forward-mode pass repeats this forward and can take its convolution outputs.
        # recompute_forward frees this forward's graph before that pass, and with it the
        # outputs the record could take: nothing is recorded for it.
        record = PrimalRecord() if forward_meta_step and self._second_order_ops else None
        # A reverse-mode meta step differentiates this forward's gradient once more.
        ops = second_order_ops(validation is not None and not self._forward_mode
                               and self._second_order_ops)
        # A forward-mode meta step keeps this forward's graph through the validation pass:
        # its batch norm and ReLU outputs are computed again for the final gradient instead.
        activations = RecomputedActivations(
            forward_meta_step and self._batch_norm and not self.recompute_forward, keep=True)
        with ops, recording_primals(None if self.recompute_forward else record), \
                activations.forward():
            output = fm(theta, committed, x)
        losses = self._per_sample_losses(output, y, "training loss")
        watched: list[tuple[str, Tensor]] = [("training loss", losses)]
        adam_rows: Tensor | None = None
        meta = group_ids = group_means = None
        current = block[:, _WEIGHT]
        if validation is not None:
            meta, row_grads, val_losses, (group_ids, group_means) = self._meta_gradient(
                theta, losses, current, inverse, (x, y, rng, record), ops, activations,
                *validation)
            # Each rank's gradient on the rows of its own samples, summed over ranks.
            row_grads = coll.sum(row_grads)
            watched += [("validation loss", val_losses), ("meta-loss", meta),
                        (_WEIGHT_GRADIENT, row_grads)]
            new_rows, adam_rows = self._updated_rows(current, row_grads.to(current.device),
                                                     adam_state)
        else:
            new_rows = current
        if validation is not None and self.recompute_forward:
            # The look-ahead freed the first forward's graph: the same forward again (its
            # buffer updates discarded, its random draws replayed) for the final gradient.
            assert rng is not None
            with replaying(rng):
                losses = self._per_sample_losses(
                    fm(theta, fm.clone_buffers() if fm.buffer_names else {}, x), y,
                    "training loss")
        new_weights = coll.softmax(_take(new_rows.to(losses.device), inverse))
        weighted_losses = new_weights * losses
        final_loss = weighted_losses.sum()
        final_grads = torch.autograd.grad(self._scaled(final_loss), theta, allow_unused=True)
        ema_values = weighted_losses.detach() * n_global
        if coll.distributed:  # every rank keeps the whole batch's moving averages
            ema_values = coll.gather(ema_values)
        new_block = self._next_rows(block, new_rows, ema_values, all_inverse)
        # final_loss is the sentinel: NaN anywhere upstream (losses, meta-loss, weights)
        # reaches it.
        return _Outcome(final_grads, committed, watched, final_loss.detach(), final_loss, False,
                        new_weights.detach() * n_global, new_block, adam_rows, meta, group_ids,
                        group_means)

    def _compiled_outcome(
        self, x: Batch, y: Any, block: Tensor, inverse: Tensor | slice | None,
        adam_state: Tensor | None, validation: tuple[Batch, Any, Tensor],
    ) -> _Outcome:
        """A meta step's :class:`_Outcome`, computed by the compiled ``torch.func`` form (one
        process: ``inverse`` is None or the tensor of each sample's row)."""
        fm = self._fmodel
        device = fm.params[0].device
        if self._compiled_meta_step is None:
            self._compiled_meta_step = compile_method(self._functional_meta_step)
        x_val, y_val, g_val = validation
        # The look-ahead step size as a tensor: a float would be baked into the graph, and a
        # learning-rate schedule would then recompile the step each time it changes the rate.
        step = torch.tensor(self._lookahead_lr() * (1.0 if self.reverse_lookahead else -1.0),
                            device=device, dtype=block.dtype)
        # So is the weights' rate, so that the reweighters of a sweep over weight_lr find
        # their graph in torch's compile cache instead of each compiling it.
        weight_lr = torch.tensor(self.weight_lr, device=device, dtype=block.dtype)
        n_global = block.shape[0] if inverse is None else inverse.numel()
        before = rng_snapshot(device) if not self._compiled_checked else None
        try:
            (final_grads, committed, losses, val_losses, meta, row_grads, final_loss, sentinel,
             batch_weights, new_block, adam_rows, group_ids, group_means) = (
                self._compiled_meta_step(
                    tuple(p.detach() for p in fm.params),
                    dict(fm.module.named_buffers()) if fm.buffer_names else {}, x, y,
                    block.to(device), inverse,
                    None if adam_state is None else adam_state.to(device),
                    x_val, y_val, g_val.to(device), step, weight_lr))
        except COMPILE_FAILURES as error:
            # A trace that stops on an exception reports only "Observed exception": take the
            # eager step (nothing committed, the random generators put back), so that a bad
            # input raises the eager step's own error; if it runs, torch.compile could not
            # handle the step.
            with replaying(rng_snapshot(device)):
                self._eager_outcome(x, y, block, inverse, inverse, adam_state, validation,
                                    n_global)
            raise compile_failure(error, type(self).__name__) from error
        if before is not None:
            def eager_gradients() -> list[Sequence[Tensor | None]]:
                eager = self._eager_outcome(x, y, block, inverse, inverse, adam_state,
                                            validation, n_global)
                return [[dict(eager.watched)[_WEIGHT_GRADIENT]], eager.final_grads]

            # The first compiled step is checked against the eager one.
            self._compiled_checked = check_against_eager(
                [[row_grads], final_grads], eager_gradients, before,
                "weight gradient, final gradient", type(self).__name__)
        self._check_groups(group_ids)
        watched = [("training loss", losses), ("validation loss", val_losses),
                   ("meta-loss", meta), (_WEIGHT_GRADIENT, row_grads)]
        return _Outcome(final_grads, committed, watched, final_loss, sentinel, True,
                        batch_weights, new_block, adam_rows, meta, group_ids, group_means)

    def _functional_meta_step(
        self, theta: tuple[Tensor, ...], buffers: dict[str, Tensor], x: Batch, y: Any,
        block: Tensor, inverse: Tensor | None, adam_state: Tensor | None, x_val: Batch,
        y_val: Any, g_val: Tensor, step: Tensor, weight_lr: Tensor,
    ) -> tuple[Any, ...]:
        """A meta step written with ``torch.func`` so that ``torch.compile`` traces all of it,
        the bookkeeping (finiteness, the rows' next moving averages) included.

        The training forward runs once, under ``torch.func.vjp``; its pullback gives the
        look-ahead gradient (differentiated with respect to the weight logits by the
        ``torch.func.grad`` around it) and, with the updated weights, the final gradient.
        """
        fm = self._fmodel

        # Buffers are copied inside each transform: torch.func refuses in-place updates
        # (running statistics) of tensors that a transformed function closes over.
        def training_losses(params: tuple[Tensor, ...]) -> tuple[Tensor, dict[str, Tensor]]:
            committed = {name: b.clone() for name, b in buffers.items()}
            output = fm.call_at(params, committed, x)
            return self._per_sample_losses(output, y, "training loss"), committed

        losses, pullback, committed = torch.func.vjp(training_losses, theta, has_aux=True)

        def meta_loss(logits: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
            (grads,) = pullback(torch.softmax(_take(logits, inverse), dim=0))
            theta_tilde = differentiable_sgd_update(theta, grads, step)
            scratch = {name: b.clone() for name, b in buffers.items()}
            val_losses = self._per_sample_losses(fm.call_at(theta_tilde, scratch, x_val),
                                                 y_val, "validation loss")
            meta, ids, means = self._meta_loss_of(val_losses, g_val)
            return meta, (meta, val_losses, ids, means)

        current = block[:, _WEIGHT]
        row_grads, (meta, val_losses, ids, means) = torch.func.grad(
            meta_loss, has_aux=True)(current)
        new_rows, adam_rows = self._updated_rows(current, row_grads, adam_state, weight_lr)
        new_weights = torch.softmax(_take(new_rows, inverse), dim=0)
        (final_grads,) = pullback(new_weights)
        weighted_losses = new_weights * losses
        final_loss = weighted_losses.sum()
        # Not finite when the final loss or any gradient is not (no reduction that could
        # overflow): the commit's one check then covers everything.
        finite = torch.stack([g.isfinite().all() for g in final_grads]).all()
        sentinel = torch.where(finite, final_loss, torch.nan)
        n = losses.shape[0]
        new_block = self._next_rows(block, new_rows, weighted_losses * n, inverse)
        return (final_grads, committed, losses, val_losses, meta, row_grads, final_loss,
                sentinel, new_weights * n, new_block, adam_rows, ids, means)

    def _meta_gradient(
        self, theta: tuple[Tensor, ...], losses: Tensor, current: Tensor,
        inverse: Tensor | slice | None,
        train: tuple[Batch, Any, RngSnapshot | None, PrimalRecord | None],
        forward_ops: Any, activations: RecomputedActivations, x_val: Batch, y_val: Any,
        g_val: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor]]:
        """The meta-loss at the look-ahead parameters, its gradient on the batch's rows, the
        validation losses and the (group ids, group mean losses), all detached.

        ``train`` is the training batch ``(x, y, rng_state, primal_record)``, replayed by the
        forward mode; ``forward_ops`` is what ``second_order_ops`` returned for its forward and
        ``activations`` the :class:`RecomputedActivations` it ran under.
        """
        fm, coll = self._fmodel, self._coll
        forward = self._forward_mode
        logits = current.detach().to(losses.device)
        if not forward:
            logits.requires_grad_(True)
        weights = coll.softmax(_take(logits, inverse))
        weighted = (weights * losses).sum()
        # retain_graph keeps the training forward for the final update (unless it is to be
        # recomputed); only the reverse mode needs the graph of the gradient itself.
        with recomputed_batch_norm_gradients(forward_ops):
            grads = self._unscaled(torch.autograd.grad(
                self._scaled(weighted), theta, create_graph=not forward,
                retain_graph=not self.recompute_forward, materialize_grads=True))
        activations.release()
        grads = coll.sum_differentiable(grads)  # sync="exact": the global batch's gradient
        # The SGD look-ahead (torchopt.sgd's update); reverse_lookahead climbs instead (appendix
        # 7.1). Without a graph (forward mode) one fused op does it.
        step = self._lookahead_lr() * (1.0 if self.reverse_lookahead else -1.0)
        if forward:
            with torch.no_grad():
                theta_tilde = tuple(t.requires_grad_(True) for t in
                                    torch._foreach_add(theta, grads, alpha=step))
        else:
            theta_tilde = differentiable_sgd_update(theta, grads, step)
        del grads  # the look-ahead's graph does not save them: free them for what follows

        scratch = fm.clone_buffers() if fm.buffer_names else {}
        # The forward mode differentiates the validation graph once, while the training
        # graph is kept: its batch norm and ReLU outputs are computed again when needed.
        with RecomputedActivations(forward and self._batch_norm).forward():
            output = fm(theta_tilde, scratch, x_val)
        val_losses = self._per_sample_losses(output, y_val, "validation loss")
        g_val = g_val.to(val_losses.device)
        if coll.exact:  # the meta-loss of the concatenated validation batches, on every rank
            val_losses, g_val = coll.gather_differentiable(val_losses), coll.gather(g_val)
        meta, ids, means = self._meta_loss_of(val_losses, g_val)
        self._check_groups(ids)
        # Under sync="exact" every rank holds the same meta-loss and the gather's backward sums
        # the ranks' gradients: divide by the world size.
        target = self._scaled(meta / coll.world_size if coll.exact else meta)
        if forward:
            v = self._unscaled(torch.autograd.grad(target, theta_tilde, materialize_grads=True))
            # Drop the look-ahead parameters, and the validation graph that holds on to them,
            # before the forward-mode pass.
            meta, val_losses, means = meta.detach(), val_losses.detach(), means.detach()
            del target, theta_tilde
            row_grads = self._forward_row_gradients(
                v, theta, weights.detach(), step, logits, inverse, train)
        else:
            (row_grads,) = self._unscaled(torch.autograd.grad(
                target, logits, allow_unused=True))
            if row_grads is None:
                row_grads = torch.zeros_like(logits)
        return (meta.detach(), row_grads.detach(), val_losses.detach(),
                (ids, means.detach()))

    def _meta_loss_of(self, val_losses: Tensor, g_val: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The meta-loss of the validation losses, the group ids and each group's mean loss."""
        ids, means = group_mean_losses(val_losses, g_val)
        if self._meta_from_means is not None:
            meta = self._meta_from_means(means, val_losses)
        else:
            meta = self._meta_loss_fn(val_losses, g_val)
        if not isinstance(meta, Tensor) or meta.dim() != 0:
            raise ValueError("meta_loss must return a scalar (0-dim) tensor.")
        return meta, ids, means

    def _check_groups(self, ids: Tensor) -> None:
        if self._needs_groups and ids.numel() < 2:
            raise ValueError(
                f"The validation batch holds {ids.numel()} group(s), but the "
                f"{self.meta_loss_name} meta-loss compares groups and needs at least two. "
                "Draw validation batches with metafair_opt.GroupBalancedBatchSampler."
            )

    def _forward_row_gradients(
        self, v: Sequence[Tensor], theta: tuple[Tensor, ...],
        weights: Tensor, step: float, logits: Tensor, inverse: Tensor | slice | None,
        train: tuple[Batch, Any, RngSnapshot | None, PrimalRecord | None],
    ) -> Tensor:
        """The meta-loss's gradient on the batch's rows without a second-order graph.

        With ``v`` the meta-loss's gradient at the look-ahead parameters (this rank's) and
        ``theta~ = theta + step * sum_j s_j grad l_j(theta)``, the meta-loss changes with the
        normalised weight ``s_j`` at the rate ``step * <grad l_j(theta), v>``: the directional
        derivatives of the training losses along ``v``, one forward-mode pass for the whole
        batch. The softmax's backward maps them to the logits.
        """
        fm, coll = self._fmodel, self._coll
        v = tuple(t.detach() for t in coll.sum_differentiable(v))  # exact: every rank's rows
        x, y, rng, record = train
        assert rng is not None  # taken before the training forward whenever the mode is forward
        # Replay the training forward's random draws (dropout), on the buffers it started from
        # (a copy: the model's own are committed only with the step), so the derivatives are
        # those of the very losses the step weights; the generators continue as if nothing ran
        # here.
        with (replaying(rng), _without_float16_autocast(theta[0].device), fwad.dual_level(),
              replaying_primals(record)):
            duals = _make_duals(theta, v)
            try:
                output = self._fmodel(duals, fm.clone_buffers() if fm.buffer_names else {}, x)
                dual_losses = self._per_sample_losses(output, y, "training loss")
            except RuntimeError as error:  # torch's missing-jvp errors derive from it
                if "forward" not in str(error) and "jvp" not in str(error):
                    raise
                raise ValueError(
                    "weight_grad_mode='forward' needs forward-mode AD through the model and "
                    f"loss_fn, and torch refused: {error} Build the SampleReweighter with "
                    "weight_grad_mode='reverse' (the double backward), or give the custom "
                    "autograd.Function a jvp."
                ) from error
            tangent = fwad.unpack_dual(dual_losses).tangent
        rates = (torch.zeros_like(weights) if tangent is None
                 else tangent.detach().to(weights.dtype) * step)
        weighted_rate = (weights * rates).sum()
        if coll.exact:  # the softmax normalises over every rank's rows
            weighted_rate = coll.sum(weighted_rate)
        local = (weights * (rates - weighted_rate)).to(logits.dtype)  # softmax backward
        if inverse is None:
            return local
        row_grads = torch.zeros_like(logits)
        if isinstance(inverse, slice):
            row_grads[inverse] = local
            return row_grads
        return row_grads.index_add_(0, inverse, local)

    # ------------------------------------------------------------------------- internals
    def _check_shards(self, n: int, val: tuple[Batch, Any, Tensor] | None,
                      idx: Tensor) -> int:
        """Under DDP: table indices in range on every rank, the same batch size on every rank
        (and validation batch size under ``sync="exact"``), and two groups in every rank's
        validation batch where the meta-loss compares groups (``sync="outer"``). One gather
        carries every rank's facts, so all ranks raise together. Returns the global batch size."""
        coll = self._coll
        n_val = groups = 0
        if val is not None:
            n_val = int(val[2].numel())
            groups = int(torch.unique(val[2]).numel())
        in_range = self._in_range(idx)
        counts = coll.gather_counts([n, n_val, groups, int(in_range)],
                                    self._fmodel.params[0].device).tolist()
        outside = [rank for rank, c in enumerate(counts) if not c[3]]
        if not in_range:
            self._raise_out_of_range(idx)
        if outside:
            raise IndexError(
                f"Sample indices on rank(s) {outside} are outside the weight table's range "
                f"[0, {self.num_samples}) (this rank's are inside). Nothing was updated on any "
                "rank; that rank's error names the index."
            )
        sizes = [c[0] for c in counts]
        empty = [rank for rank, size in enumerate(sizes) if size == 0]
        if empty:
            raise ValueError(f"{_EMPTY_BATCH} (rank(s) {empty}); nothing was updated on any "
                             "rank.")
        if len(set(sizes)) > 1:
            raise ValueError(
                f"SampleReweighter under DDP needs the same batch size on every rank; got "
                f"{sizes}. Shard with torch.utils.data.DistributedSampler(drop_last=True) and "
                "a DataLoader with drop_last=True."
            )
        if val is not None and coll.exact and len({c[1] for c in counts}) > 1:
            raise ValueError(
                "sync='exact' needs validation batches of the same size on every rank; got "
                f"{[c[1] for c in counts]}. Give every rank's GroupBalancedBatchSampler the "
                "same batch_size."
            )
        if val is not None and self._needs_groups and not coll.exact:
            short = [rank for rank, c in enumerate(counts) if c[2] < 2]
            if short:
                raise ValueError(
                    f"The validation batch of rank(s) {short} holds fewer than two groups, but "
                    f"the {self.meta_loss_name} meta-loss compares groups on every rank under "
                    "sync='outer'. Draw each rank's validation batches with "
                    "metafair_opt.GroupBalancedBatchSampler(rank=..., world_size=...)."
                )
        return sum(sizes)

    def _checked_indices(self, idx: Any, rows: int) -> Tensor:
        """``idx`` as int64 row indices on the table's device. The range is checked by
        :meth:`step` (in one process, on the sorted unique rows it takes anyway) and under DDP,
        with an empty batch, by :meth:`_check_shards`, so that every rank raises."""
        if rows == 0 and not self._coll.distributed:
            raise ValueError(f"{_EMPTY_BATCH}.")
        idx = torch.as_tensor(idx)
        if idx.dtype.is_floating_point or idx.dtype == torch.bool:
            raise TypeError(f"idx must hold integer dataset indices; got dtype {idx.dtype}.")
        idx = as_row_vector(idx, "idx").long()
        if idx.numel() != rows:
            raise ValueError(f"idx has {idx.numel()} entries but the batch has {rows} rows.")
        return idx.to(self._rows.device)

    def _checked_repeats(self, idx: Tensor) -> tuple[Tensor, Tensor] | None:
        """Raise IndexError unless every index of ``idx`` (one process's, not empty) is a row
        of the table; None when no index repeats, else ``torch.unique(idx,
        return_inverse=True)``.

        A batch of up to :data:`_HOST_CHECK_ROWS` indices on the CPU is checked as a Python
        list: for 256 indices 14 microseconds against 23 for torch.unique and reading its ends
        (alone; within a W1 training step the sort cost about 70), and a plain weighted W1 step
        7 % less time. From 512 indices on, sorting is as cheap or cheaper.
        """
        if idx.device.type == "cpu" and idx.numel() <= _HOST_CHECK_ROWS:
            values = idx.tolist()
            if min(values) < 0 or max(values) >= self.num_samples:
                self._raise_out_of_range(idx)
            if len(set(values)) == len(values):
                return None
            return torch.unique(idx, return_inverse=True)
        unique_rows = torch.unique(idx, return_inverse=True)
        low, high = unique_rows[0][[0, -1]].tolist()  # sorted: the ends are the extremes
        if low < 0 or high >= self.num_samples:
            self._raise_out_of_range(idx)
        return None if unique_rows[0].numel() == idx.numel() else unique_rows

    def _in_range(self, idx: Tensor) -> bool:
        if idx.numel() == 0:
            return True  # nothing outside; _check_shards refuses the empty batch
        low, high = torch.aminmax(idx)
        return int(low) >= 0 and int(high) < self.num_samples

    def _raise_out_of_range(self, idx: Tensor) -> None:
        outside = (idx < 0) | (idx >= self.num_samples)
        raise IndexError(
            f"Sample index {int(idx[outside][0])} is outside the weight table's range "
            f"[0, {self.num_samples}){self._on_rank()}. idx must hold dataset indices "
            "(IndexedDataset gives them) and num_samples must equal len(train_dataset)."
        )

    def _checked_validation(self, val: Any) -> tuple[Batch, Any, Tensor]:
        if not isinstance(val, (tuple, list)) or len(val) != 3:
            raise TypeError("val must be a validation batch (x_val, y_val, groups_val).")
        x_val, y_val, g_val = val
        n_val = check_same_batch_size(x_val, y_val, "x_val", "y_val")
        return x_val, y_val, as_row_vector(g_val, "groups_val", rows=n_val)

    def _per_sample_losses(self, output: Any, target: Any, what: str) -> Tensor:
        rows = batch_size(target, "target") if not isinstance(output, Tensor) else output.shape[0]
        try:
            losses = self.loss_fn(output, target, reduction="none")
        except TypeError as error:
            raise ValueError(
                "loss_fn must give one loss per sample: SampleReweighter calls "
                "loss_fn(output, target, reduction='none'), and this loss_fn failed with "
                f"{error!r}. Use a torch.nn.functional loss or accept a reduction argument."
            ) from error
        if not isinstance(losses, Tensor) or losses.dim() == 0 or losses.numel() != rows:
            shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            raise ValueError(
                f"loss_fn(output, target, reduction='none') must return one loss per sample, "
                f"shape ({rows},); for the {what} it returned {shape}. A loss that reduces "
                "over the batch cannot be reweighted."
            )
        # A reshape only where needed: even a no-op view adds a node to the double backward.
        return losses if losses.dim() == 1 else losses.reshape(rows)

    def _lookahead_lr(self) -> float:
        """``lookahead_lr``, or the optimizer's current learning rate when it is None."""
        return float(self.lookahead_lr if self.lookahead_lr is not None
                     else self.param_groups[0]["lr"])

    def _updated_rows(
        self, current: Tensor, grads: Tensor, state: Tensor | None,
        weight_lr: float | Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """New values for rows whose weights are ``current`` and, for Adam, their new state
        (columns exp_avg, exp_avg_sq, steps) from their ``state`` (None: never updated);
        nothing is stored. ``weight_lr`` (default: the reweighter's) is a 0-dim tensor in the
        compiled step."""
        rate = self.weight_lr if weight_lr is None else weight_lr
        if self.weight_optimizer == "sgd":
            return differentiable_sgd_update((current,), (grads,), -rate)[0], None
        beta1, beta2 = self.adam_betas
        if state is None:
            steps = torch.ones_like(grads)
            exp_avg = (1 - beta1) * grads
            exp_avg_sq = (1 - beta2) * grads * grads
        else:
            steps = state[:, 2] + 1
            exp_avg = torch.lerp(grads, state[:, 0], beta1)
            exp_avg_sq = torch.lerp(grads * grads, state[:, 1], beta2)
        corrected_avg = exp_avg / (1 - beta1 ** steps)
        corrected_sq = exp_avg_sq / (1 - beta2 ** steps)
        new_rows = current - rate * corrected_avg / (corrected_sq.sqrt() + self.adam_eps)
        return new_rows, torch.stack([exp_avg, exp_avg_sq, steps], dim=1)

    def _next_rows(self, block: Tensor, weights: Tensor, values: Tensor,
                   inverse: Tensor | None) -> Tensor:
        """The batch rows' next (weight, moving average, count): ``block`` holds their current
        ones, ``values`` the step's normalised weighted losses, mapped to the rows by
        ``inverse`` (None: one value per row, in order; otherwise the mean of each row's)."""
        values = values.to(block.device, block.dtype)
        if inverse is None:
            row_values, counts = values, 1.0
        else:  # duplicates in the batch
            inverse = inverse.to(block.device)
            # index_add rather than bincount: its output size does not depend on the data,
            # which a compiled graph needs.
            counts = values.new_zeros(block.shape[0]).index_add_(0, inverse,
                                                                  torch.ones_like(values))
            row_values = values.new_zeros(block.shape[0]).index_add_(0, inverse, values) / counts
        previous = block[:, _EMA]
        blended = torch.lerp(row_values, previous, self.ema_decay)  # NaN where never seen
        ema = torch.where(torch.isnan(previous), row_values, blended)
        return torch.stack([weights.to(block.dtype), ema, block[:, _SEEN] + counts], dim=1)


@dataclass
class _Outcome:
    """What a step computed before anything is committed (eager or compiled alike)."""

    final_grads: Sequence[Tensor | None]
    committed: dict[str, Tensor]  # the buffers after the training forward
    watched: list[tuple[str, Tensor]]  # the step's losses and weight gradients, named
    final_loss: Tensor  # detached
    sentinel: Tensor  # not finite when anything upstream of the final loss is not
    grads_in_sentinel: bool  # ... and when a gradient is not
    batch_weights: Tensor  # the normalised weights under the updated table, uniform = 1
    new_block: Tensor  # the batch rows' next (weight, moving average, count)
    adam_rows: Tensor | None
    meta: Tensor | None  # None on a step without a weight update
    group_ids: Tensor | None
    group_means: Tensor | None


_WEIGHT, _EMA, _SEEN = 0, 1, 2  # the columns of SampleReweighter's row table
#: The largest CPU batch whose indices :meth:`SampleReweighter._checked_repeats` checks on the
#: host (measured alone, one thread: a Python set 14 / 28 / 55 microseconds for 256 / 512 / 1024
#: indices, torch.unique and its ends 23 / 27 / 33).
_HOST_CHECK_ROWS = 512
_WEIGHT_GRADIENT = "meta-gradient of the batch's weights"  # its name among a step's values
_EMPTY_BATCH = "The training batch is empty; a step needs at least one row"
_COMPILED_MODEL_REMEDY = (
    "Pass the model uncompiled (a torch.compile'd module keeps it as ._orig_mod; one compiled "
    "in place with .compile() has to be built again without it) with compiled=True, which "
    "compiles the whole weight-updating step, or use weight_grad_mode='forward', which "
    "differentiates no backward (torch.compile runs a compiled model eagerly once the forward "
    "mode has fed it dual tensors; should torch refuse its donated buffers, set "
    "torch._functorch.config.donated_buffer = False, as its message says)."
)


def _packed(like: Tensor, *columns: Tensor) -> Tensor:
    """``columns`` (one value per example each) as one table of ``like``'s dtype and device."""
    return torch.stack([c.detach().to(like.device, like.dtype) for c in columns], dim=1)


_forward_ad_loaded = False


def _make_duals(primals: Sequence[Tensor], tangents: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """Dual tensors of ``primals`` (detached) along ``tangents``, inside a ``dual_level``."""
    global _forward_ad_loaded
    if not _forward_ad_loaded:
        # The first make_dual loads torch's forward-AD decompositions, which warns that
        # torch.jit.script is deprecated: torch's own business, not the user's.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*",
                                    category=FutureWarning)
            duals = tuple(fwad.make_dual(p.detach(), t) for p, t in zip(primals, tangents))
        _forward_ad_loaded = True
        return duals
    return tuple(fwad.make_dual(p.detach(), t) for p, t in zip(primals, tangents))


@contextmanager
def _without_float16_autocast(device: torch.device) -> Iterator[None]:
    """Disable float16 autocast for the block (bfloat16 and float32 pass through).

    Forward-mode AD has no loss scaling: in float16 the tangents of steep spots (BatchNorm's
    inverse standard deviation over a nearly constant channel) overflow where the primal
    kernels, which accumulate in float32, do not.
    """
    if (torch.is_autocast_enabled(device.type)
            and torch.get_autocast_dtype(device.type) == torch.float16):
        with torch.autocast(device.type, enabled=False):
            yield
    else:
        yield


def _take(values: Tensor, inverse: Tensor | slice | None) -> Tensor:
    """``values[inverse]``; None takes them all, as they are."""
    return values if inverse is None else values[inverse]
