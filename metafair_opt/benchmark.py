"""Per-step overhead of the meta-optimisers against a plain step and against peers.

Workloads (issue "Benchmarks"): ``mlp`` (W1: 100 inputs, two hidden layers of 64, ReLU, one
logit; batch 256 split 80/176 into X_s/X_q) and ``resnet18`` (W2: our ResNet-18 builder on
3x32x32, batch 64 split 24/40, BatchNorm in train mode). The reweighter variants use the same
training batch and a validation batch of 64 rows from two groups.

Variants: ``plain`` (forward, backward, optimizer step on the whole batch), our
``alignment`` (second order, 1 inner step), ``alignment_first_order``, ``alignment_5_inner``,
``reweighter`` and ``reweighter_every_5`` (``meta_every=5``, amortised), the same steps written
with ``higher`` and by hand with ``torch.func.functional_call`` + ``torch.autograd.grad`` (their
``_every_5`` forms take the plain weighted steps in between as written in plain PyTorch), and
``alignment_compiled`` / ``alignment_first_order_compiled`` / ``reweighter_compiled``
(``compiled=True``: compiled once before timing, so the medians are the steady state; the
compile time is not in them), ``alignment_recompute`` (``recompute_support=True``: the support
forward and backward run again for a Hessian-vector product instead of kept through the query
pass) and ``reweighter_recompute`` (``recompute_forward=True``: the training forward run again
instead of kept through the validation pass).
Every implementation of a variant is checked to give the same gradients before anything is timed.
Memory, measured in fresh processes (two at a time: each measures only itself), each after one
warm-up step: the step's peak of live tensor bytes above those live before it
(``peak_live_mb``: the CUDA allocator's statistics, or on the CPU the allocator's records from
``torch.profiler``), and on the CPU also the step's peak resident memory above the RSS before it
(``peak_rss_mb``; the warm-up's freed memory is first handed back to the system with glibc's
``malloc_trim``); each the median of :data:`MEMORY_REPEATS` processes per variant (one with
``quick``), which the RSS needs (it moves by 10-20 % from one process to the next), with the RSS
peaks' range (``peak_rss_mb_min``, ``peak_rss_mb_max``).
"""

from __future__ import annotations

import gc
import math
import random
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metafair_opt.alignment import GradientAlignmentWrapper
from metafair_opt.reweighting import SampleReweighter

__all__ = [
    "AGREEMENT_PAIRS",
    "AGREEMENT_TOLERANCE",
    "CYCLE_STEPS",
    "VARIANTS",
    "WORKLOADS",
    "ImplementationsDisagree",
    "Rates",
    "Workload",
    "check_agreement",
    "live_bytes_growth",
    "machine_description",
    "make_alignment_step",
    "make_reweighter_step",
    "make_step",
    "make_workload",
    "measure_memory",
    "memory_caption",
    "memory_repeats",
    "peak_live_mb",
    "peak_rss_mb",
    "significant",
    "step_peak_memory_mb",
    "time_interleaved",
    "time_pairwise",
]

WORKLOADS = ("mlp", "resnet18")
#: Steps making one cycle of a variant whose steps differ (amortised over the cycle): one
#: weight update and four plain weighted steps.
CYCLE_STEPS = {"reweighter_every_5": 5, "higher_reweighter_every_5": 5,
               "torchfunc_reweighter_every_5": 5}
#: Fresh processes measuring memory at once: each measures only itself (its own RSS, its own
#: allocator), so they need not wait for one another.
MEMORY_PROCESSES = 2
#: Fresh processes per variant whose figures :func:`measure_memory` reports the median of: a
#: single process's peak RSS moves by 10-20 % from one to the next.
MEMORY_REPEATS = 3
VARIANTS = (
    "plain", "alignment", "alignment_first_order", "alignment_5_inner", "reweighter",
    "reweighter_every_5", "higher_alignment", "higher_reweighter", "torchfunc_alignment",
    "torchfunc_reweighter", "higher_alignment_first_order", "torchfunc_alignment_first_order",
    "higher_alignment_5_inner", "torchfunc_alignment_5_inner", "alignment_compiled",
    "alignment_first_order_compiled", "reweighter_compiled", "alignment_recompute",
    "reweighter_recompute", "higher_reweighter_every_5", "torchfunc_reweighter_every_5",
)
INNER_LR = 0.01
LOOKAHEAD_LR = 0.01
WEIGHT_LR = 0.01


@dataclass(frozen=True)
class Rates:
    """The step sizes every implementation of a variant takes: the alignment's inner SGD
    step, the reweighter's look-ahead step and its weight table's SGD step, and the model's
    SGD step."""

    inner: float = INNER_LR
    lookahead: float = LOOKAHEAD_LR
    weight: float = WEIGHT_LR
    model: float = 1e-3


@dataclass
class Workload:
    """A model factory and fixed batches (train, its X_s/X_q split, and a validation batch)."""

    name: str
    build: Callable[[], nn.Module]
    x: Tensor
    y: Tensor
    support: Tensor
    x_val: Tensor
    y_val: Tensor
    g_val: Tensor
    loss: Callable[..., Tensor]

    def sets(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The training batch split into X_s, y_s, X_q, y_q."""
        return (self.x[self.support], self.y[self.support], self.x[~self.support],
                self.y[~self.support])

    def model(self, device: torch.device) -> nn.Module:
        torch.manual_seed(0)
        return self.build().to(device).train()


def _bce(output: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    return F.binary_cross_entropy_with_logits(output.reshape(-1), target, reduction=reduction)


def make_workload(name: str, device: torch.device | str = "cpu") -> Workload:
    """W1 (``mlp``) or W2 (``resnet18``) with seeded data on ``device``."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    if name == "mlp":
        def build() -> nn.Module:
            return nn.Sequential(nn.Linear(100, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                                 nn.Linear(64, 1))
        x, x_val = torch.randn(256, 100, generator=g), torch.randn(64, 100, generator=g)
        y = (torch.rand(256, generator=g) > 0.5).float()
        y_val = (torch.rand(64, generator=g) > 0.5).float()
        n_support, loss = 80, _bce
    elif name == "resnet18":
        from metafair_opt.integrations.vision.models import build_resnet18

        def build() -> nn.Module:
            return build_resnet18(10, small_input=True)
        x = torch.randn(64, 3, 32, 32, generator=g)
        x_val = torch.randn(64, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (64,), generator=g)
        y_val = torch.randint(0, 10, (64,), generator=g)
        n_support, loss = 24, F.cross_entropy
    else:
        raise ValueError(f"Unknown workload {name!r}; choose from {list(WORKLOADS)}.")
    support = torch.zeros(x.shape[0], dtype=torch.bool)
    support[:n_support] = True
    return Workload(name, build, x.to(device), y.to(device), support.to(device),
                    x_val.to(device), y_val.to(device), (torch.arange(64) % 2).to(device), loss)


# ------------------------------------------------------------------------------- peers
def _higher_alignment(model, optimizer, w: Workload, rates: Rates, steps: int = 1,
                      first_order: bool = False) -> Callable[[], None]:
    import higher

    inner = torch.optim.SGD(model.parameters(), lr=rates.inner)
    xs, ys, xq, yq = w.sets()
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        optimizer.zero_grad()
        with higher.innerloop_ctx(model, inner, copy_initial_weights=False,
                                  track_higher_grads=not first_order) as (fmodel, diffopt):
            for _ in range(steps):
                diffopt.step(w.loss(fmodel(xs), ys))
            query = w.loss(fmodel(xq), yq)
            if first_order:
                # Untracked, the adapted weights are new leaves: their gradient is the step's.
                adapted = [p for p in fmodel.parameters() if p.requires_grad]
                for p, g in zip(params, torch.autograd.grad(query, adapted)):
                    p.grad = g
            else:
                query.backward()
        optimizer.step()
    return step


def _torchfunc_alignment(model, optimizer, w: Workload, rates: Rates, steps: int = 1,
                         first_order: bool = False) -> Callable[[], None]:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    xs, ys, xq, yq = w.sets()

    def step() -> None:
        optimizer.zero_grad()
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        fast = params
        for _ in range(steps):
            out = functional_call(model, ({**dict(zip(names, fast)), **buffers}), (xs,))
            # First order: inner gradients without a graph, so the adapted parameters move
            # with the originals one for one and the query gradient is taken at them.
            grads = torch.autograd.grad(w.loss(out, ys), fast, create_graph=not first_order)
            fast = [p - rates.inner * g for p, g in zip(fast, grads)]
        query = w.loss(functional_call(model, dict(zip(names, fast)), (xq,)), yq)
        for p, g in zip(params, torch.autograd.grad(query, params)):
            p.grad = g
        optimizer.step()
    return step


def _every(meta_every: int, meta_step: Callable[[], None], model, optimizer, w: Workload,
           table: Tensor) -> Callable[[], None]:
    """A peer's ``meta_every``: ``meta_step`` on the first call and every ``meta_every``-th
    after it, and in between a plain step on the batch's losses weighted by the softmax of
    ``table`` (the weights as the last meta step left them), written in plain PyTorch."""
    if meta_every == 1:
        return meta_step
    calls = 0

    def step() -> None:
        nonlocal calls
        if calls % meta_every == 0:
            meta_step()
        else:
            optimizer.zero_grad()
            (torch.softmax(table, 0) * w.loss(model(w.x), w.y, reduction="none")).sum().backward()
            optimizer.step()
        calls += 1
    return step


def _higher_reweighter(model, optimizer, w: Workload, table: Tensor,
                       rates: Rates) -> Callable[[], None]:
    import higher

    from metafair_opt.meta_losses import mean_loss_discrepancy

    inner = torch.optim.SGD(model.parameters(), lr=rates.lookahead)

    def step() -> None:
        optimizer.zero_grad()
        logits = table.clone().requires_grad_(True)
        # At the model's own parameters (not copies), the training forward serves the
        # look-ahead and the final gradient, as in ours and the hand-written step.
        with higher.innerloop_ctx(model, inner, copy_initial_weights=False) as (fmodel, diffopt):
            losses = w.loss(fmodel(w.x), w.y, reduction="none")
            diffopt.step((torch.softmax(logits, 0) * losses).sum())
            meta = mean_loss_discrepancy(w.loss(fmodel(w.x_val), w.y_val, reduction="none"),
                                         w.g_val)
            (grad,) = torch.autograd.grad(meta, logits)
        with torch.no_grad():
            table.sub_(grad, alpha=rates.weight)  # plain SGD keeps the peers comparable
        (torch.softmax(table, 0) * losses).sum().backward()
        optimizer.step()
    return step


def _torchfunc_reweighter(model, optimizer, w: Workload, table: Tensor,
                          rates: Rates) -> Callable[[], None]:
    from metafair_opt.meta_losses import mean_loss_discrepancy

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        optimizer.zero_grad()
        logits = table.clone().requires_grad_(True)
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        losses = w.loss(model(w.x), w.y, reduction="none")
        weighted = (torch.softmax(logits, 0) * losses).sum()
        grads = torch.autograd.grad(weighted, params, create_graph=True)
        fast = {n: p - rates.lookahead * g for n, p, g in zip(names, params, grads)}
        val = functional_call(model, {**fast, **buffers}, (w.x_val,))
        meta = mean_loss_discrepancy(w.loss(val, w.y_val, reduction="none"), w.g_val)
        # No retain_graph: the training forward's graph, which the final gradient needs, is
        # not on the meta-gradient's path, and the rest is freed as in ours and higher's.
        (grad,) = torch.autograd.grad(meta, logits)
        with torch.no_grad():
            table.sub_(grad, alpha=rates.weight)
        final = (torch.softmax(table, 0) * losses).sum()
        for p, g in zip(params, torch.autograd.grad(final, params)):
            p.grad = g
        optimizer.step()
    return step


# ---------------------------------------------------------------------------- variants
def make_step(variant: str, w: Workload, device: torch.device | str = "cpu",
              lr: float = 1e-3) -> tuple[Callable[[], None], nn.Module]:
    """A zero-argument training step of ``variant`` on ``w`` and the model it trains."""
    built = _build(variant, w, device, Rates(model=lr))
    return built.step, built.model


@dataclass
class _Built:
    """A variant's step, the model it trains and, for the reweighters, a reader and a writer
    of its weight table (logits)."""

    step: Callable[[], None]
    model: nn.Module
    table: Callable[[], Tensor] | None = None
    set_table: Callable[[Tensor], None] | None = None


def _build(variant: str, w: Workload, device: torch.device | str, rates: Rates,
           logits: Tensor | None = None) -> _Built:
    """``variant`` (one of :data:`VARIANTS`)'s step on ``w`` at ``rates``; a reweighter's
    table starts at ``logits`` (None: zeros)."""
    device = torch.device(device)
    model = w.model(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=rates.model)
    n = w.x.shape[0]
    if variant == "plain":
        def plain() -> None:
            optimizer.zero_grad()
            w.loss(model(w.x), w.y).backward()
            optimizer.step()
        return _Built(plain, model)
    if variant.startswith("alignment"):
        align = _alignment_step(
            w, model, optimizer, inner_lr=rates.inner,
            inner_steps=5 if variant == "alignment_5_inner" else 1,
            first_order=variant.startswith("alignment_first_order"),
            compiled=variant.endswith("_compiled"),
            recompute_support=variant == "alignment_recompute")
        return _Built(align, model)
    if variant.startswith("reweighter"):
        reweight, rw = _reweighter_step(
            w, model, optimizer, meta_every=5 if variant == "reweighter_every_5" else 1,
            compiled=variant.endswith("_compiled"),
            recompute_forward=variant.endswith("_recompute"), weight_lr=rates.weight,
            lookahead_lr=rates.lookahead)

        def set_logits(values: Tensor) -> None:
            state = rw.state_dict()
            state["weights"] = values
            rw.load_state_dict(state)

        if logits is not None:
            set_logits(logits)
        return _Built(reweight, model, lambda: rw.weights, set_logits)
    table = torch.zeros(n, device=device) if logits is None else logits.to(device).clone()
    peers = {
        "higher_alignment": lambda: _higher_alignment(model, optimizer, w, rates),
        "higher_alignment_5_inner": lambda: _higher_alignment(model, optimizer, w, rates, 5),
        "higher_alignment_first_order": lambda: _higher_alignment(model, optimizer, w, rates,
                                                                  first_order=True),
        "torchfunc_alignment": lambda: _torchfunc_alignment(model, optimizer, w, rates),
        "torchfunc_alignment_5_inner": lambda: _torchfunc_alignment(model, optimizer, w,
                                                                    rates, 5),
        "torchfunc_alignment_first_order": lambda: _torchfunc_alignment(
            model, optimizer, w, rates, first_order=True),
        "higher_reweighter": lambda: _higher_reweighter(model, optimizer, w, table, rates),
        "torchfunc_reweighter": lambda: _torchfunc_reweighter(model, optimizer, w, table, rates),
    }
    peer, every_5 = variant.removesuffix("_every_5"), variant.endswith("_every_5")
    if peer not in peers or (every_5 and not peer.endswith("reweighter")):
        raise ValueError(f"Unknown variant {variant!r}; choose from {list(VARIANTS)}.")
    if not peer.endswith("reweighter"):
        return _Built(peers[peer](), model)
    step = _every(5 if every_5 else 1, peers[peer](), model, optimizer, w, table)
    return _Built(step, model, table.clone, table.copy_)


def make_alignment_step(w: Workload, device: torch.device | str = "cpu", lr: float = 1e-3,
                        **options: Any) -> tuple[Callable[[], None], nn.Module]:
    """The ``alignment`` variant's step on ``w`` with ``options`` (``GradientAlignmentWrapper``
    keyword arguments, e.g. ``inner_steps=5, recompute_support=True``) set, and the model it
    trains."""
    model = w.model(torch.device(device))
    step = _alignment_step(w, model, torch.optim.SGD(model.parameters(), lr=lr), **options)
    return step, model


def _alignment_step(w: Workload, model: nn.Module, optimizer: torch.optim.Optimizer,
                    **options: Any) -> Callable[[], None]:
    """One alignment step on ``w``'s X_s/X_q split (the benchmark's inner rate, ``options`` on
    top)."""
    xs, ys, xq, yq = w.sets()
    aligner = GradientAlignmentWrapper(model, optimizer, loss_fn=w.loss,
                                       **{"inner_lr": INNER_LR, **options})

    def align() -> None:
        aligner.zero_grad()
        aligner.step(support=(xs, ys), query=(xq, yq))
    return align


def make_reweighter_step(w: Workload, device: torch.device | str = "cpu", lr: float = 1e-3,
                         **options: Any) -> tuple[Callable[[], None], nn.Module]:
    """The ``reweighter`` variant's step on ``w`` with ``options`` (``SampleReweighter``
    keyword arguments, e.g. ``weight_grad_mode="reverse"``) set, and the model it trains."""
    model = w.model(torch.device(device))
    step, _ = _reweighter_step(w, model, torch.optim.SGD(model.parameters(), lr=lr), **options)
    return step, model


def _reweighter_step(w: Workload, model: nn.Module, optimizer: torch.optim.Optimizer,
                     **options: Any) -> tuple[Callable[[], None], SampleReweighter]:
    """One reweighting step on ``w``'s whole batch (SGD weights, the benchmark's look-ahead
    and weight rates, ``options`` on top) and the reweighter."""
    n = w.x.shape[0]
    idx = torch.arange(n, device=w.x.device)
    val = (w.x_val, w.y_val, w.g_val)
    rw = SampleReweighter(model, optimizer, num_samples=n, loss_fn=w.loss,
                          **{"weight_lr": WEIGHT_LR, "weight_optimizer": "sgd",
                             "lookahead_lr": LOOKAHEAD_LR, **options})

    def reweight() -> None:
        rw.zero_grad()
        rw.step(w.x, w.y, idx, val=val)
    return reweight, rw


#: The comparisons :func:`check_agreement` makes: each of ours against its other
#: implementations.
AGREEMENT_PAIRS = (
    ("alignment", ("higher_alignment", "torchfunc_alignment", "alignment_compiled",
                   "alignment_recompute")),
    ("alignment_first_order", ("higher_alignment_first_order",
                               "torchfunc_alignment_first_order",
                               "alignment_first_order_compiled")),
    ("alignment_5_inner", ("higher_alignment_5_inner", "torchfunc_alignment_5_inner")),
    ("reweighter", ("higher_reweighter", "torchfunc_reweighter", "reweighter_compiled",
                    "reweighter_recompute")),
    ("reweighter_every_5", ("higher_reweighter_every_5", "torchfunc_reweighter_every_5")),
)
#: The largest relative difference :func:`run_suite` accepts between two implementations.
AGREEMENT_TOLERANCE = 1e-3
#: How far the largest weight logit moves in the check's first weight update.
_CHECK_LOGIT_STEP = 0.5


class ImplementationsDisagree(RuntimeError):
    """Two implementations of a benchmarked step computed different results."""


def check_agreement(w: Workload, device: torch.device | str = "cpu",
                    pairs: Sequence[tuple[str, Sequence[str]]] = AGREEMENT_PAIRS
                    ) -> dict[str, float]:
    """How far each other implementation of a variant is from ours, as a relative difference.

    For each pair both implementations start from the same model and, for the reweighters,
    the same random weight logits, and take a step at rates larger than the timed runs' (inner
    and look-ahead rate 0.1, model rate 0.1, a weight rate that moves the largest logit by 0.5)
    so that each part of a step changes the result measurably: the second-order term, the
    weight update and its effect on the final gradient, the optimizer step. Then both are put
    back to that start (parameters, buffers, weight table) and take their second step, which
    sees what goes wrong only from a second call (a recompiled graph, stale state; the first
    call of a compiled step is the one the library itself checks against the eager step). From
    where the first step leads instead, float32 rounding would decide the comparison: on W2,
    after a step at model rate 0.1, identical states gave differences of up to 2.5e-2 in the
    smallest parameters' gradients, against 2e-5 at the start.

    Returns ``{"alignment vs higher_alignment": ..., ...}`` for ``pairs`` (ours, its others):
    the largest over the two steps of the model gradients' difference (each parameter's
    against its own largest entry, or 1 % of the largest of all where that is more) and of the
    parameters' change's (against the largest change), and for the reweighters ``"...
    (weight update)"``, the weight table's change's. NaN where ours did not change (nothing
    compared). A value above :data:`AGREEMENT_TOLERANCE` is a bug in one of the two.

    For ``reweighter_every_5`` the first step updates the weights and the second, between
    weight updates, is a plain weighted step (the restored weight table is not a restored step
    count): both kinds are compared, and the tables only where either moved.

    Not compared: buffers (BatchNorm's running statistics: the peers, as written with
    ``higher`` and by hand, also update them in their look-ahead and validation forwards,
    which ours do not).
    """
    device = torch.device(device)
    logits = torch.randn(w.x.shape[0], generator=torch.Generator().manual_seed(1)).to(device)
    rates = Rates(inner=0.1, lookahead=0.1, weight=1.0, model=0.1)
    if any(ours.startswith("reweighter") for ours, _ in pairs):
        rates = replace(rates, weight=_weight_rate(w, device, rates, logits))
    report: dict[str, float] = {}
    for ours, others in pairs:
        for other in others:
            reference, candidate = (_build(v, w, device, rates, logits) for v in (ours, other))
            start = _state_of(reference)
            model_gaps, table_gaps = [], []
            tables = False
            for step in (1, 2):
                if step == 2:
                    _restore(reference, start)
                    _restore(candidate, start)
                (grads, moves, change), (their_grads, their_moves, their_change) = (
                    _one_step(built, device) for built in (reference, candidate))
                model_gaps += [_relative_difference(grads, their_grads, per_tensor=True),
                               _relative_difference(moves, their_moves)]
                if change is not None and their_change is not None:
                    tables = True
                    # Both tables left as they were (a step between weight updates): nothing
                    # to compare. One that moved alone is inf or a large difference.
                    if bool(change.any() or their_change.any()):
                        table_gaps.append(_relative_difference([change], [their_change]))
            # torch's max, not Python's: a NaN wins.
            report[f"{ours} vs {other}"] = float(torch.tensor(model_gaps).max())
            if tables:
                report[f"{ours} vs {other} (weight update)"] = float(
                    torch.tensor(table_gaps).max()) if table_gaps else math.nan
    return report


def _one_step(built: _Built, device: torch.device
              ) -> tuple[list[Tensor], list[Tensor], Tensor | None]:
    """One step of ``built``: the model gradients, the parameters' change and the weight
    table's change (None without a table)."""
    params = list(built.model.parameters())
    start = [p.detach().clone() for p in params]
    table = None if built.table is None else built.table()
    with _exact_float32(device):
        built.step()
    return ([p.grad.detach().clone() for p in params],
            [p.detach() - s for p, s in zip(params, start)],
            None if built.table is None or table is None else built.table() - table)


def _state_of(built: _Built) -> tuple[list[Tensor], list[Tensor], Tensor | None]:
    """Copies of ``built``'s parameters, buffers and weight table (None without one)."""
    return ([p.detach().clone() for p in built.model.parameters()],
            [b.detach().clone() for b in built.model.buffers()],
            None if built.table is None else built.table())


def _restore(built: _Built, state: tuple[list[Tensor], list[Tensor], Tensor | None]) -> None:
    """Put ``state`` (from :func:`_state_of`, of this or an identical model) into ``built``."""
    params, buffers, table = state
    with torch.no_grad():
        for mine, saved in ((built.model.parameters(), params),
                            (built.model.buffers(), buffers)):
            for a, b in zip(mine, saved, strict=True):
                a.copy_(b)
    if table is not None and built.set_table is not None:
        built.set_table(table)


def _weight_rate(w: Workload, device: torch.device, rates: Rates, logits: Tensor) -> float:
    """The weight rate at which our reweighter's first update moves the largest logit by
    :data:`_CHECK_LOGIT_STEP` (an SGD update is proportional to its rate)."""
    built = _build("reweighter", w, device, replace(rates, weight=1.0), logits)
    change = _one_step(built, device)[2]
    assert change is not None
    largest = float(change.abs().max())
    if not math.isfinite(largest):
        raise RuntimeError(
            f"{w.name}: our reweighter's weight update at weight rate 1 is not finite "
            f"({largest}), so the agreement check cannot scale its weight rate.")
    if largest == 0:
        raise RuntimeError(
            f"{w.name}: our reweighter's weight update is 0 at weight rate 1, so the agreement "
            "check would compare no weight update. The meta-gradient vanished: the workload's "
            "validation batch needs two groups whose losses differ.")
    return _CHECK_LOGIT_STEP / largest


def _relative_difference(ours: Sequence[Tensor], theirs: Sequence[Tensor],
                         per_tensor: bool = False) -> float:
    """max |ours - theirs| / max |ours| over all the tensors, or with ``per_tensor`` the
    largest of each pair's difference against its own largest entry, or 1 % of the largest of
    all where that is more (float32 rounding in the larger tensors would dominate below it).

    NaN where either holds a NaN or both are zero, inf where only ours are zero.
    """
    largest = torch.stack([a.abs().max() for a in ours])  # unlike Python's max, NaN wins
    gaps = torch.stack([(a - b.to(a)).abs().max() for a, b in zip(ours, theirs, strict=True)])
    scale = largest.max()
    if per_tensor:
        return float((gaps / torch.maximum(largest, 0.01 * scale)).max())
    return float(gaps.max() / scale)


@contextmanager
def _exact_float32(device: torch.device) -> Iterator[None]:
    """On CUDA, float32 matrix products and convolutions in full precision (cuDNN allows
    TensorFloat-32 by default): with its 10-bit mantissa, implementations that order the
    same products differently disagree by about 1e-3."""
    if device.type != "cuda":
        yield
        return
    settings = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)
    before = [s.fp32_precision for s in settings]
    for s in settings:
        s.fp32_precision = "ieee"
    try:
        yield
    finally:
        for s, value in zip(settings, before):
            s.fp32_precision = value


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(steps: dict[str, Callable[[], None]], repeats: int, warmup: int = 3,
                     device: torch.device | str = "cpu",
                     cycles: dict[str, int] | None = None) -> dict[str, float]:
    """Median milliseconds per step of each callable (one step per call), interleaved in one
    process.

    Every round runs each callable once, in an order shuffled afresh (seeded) for every round:
    in a fixed order each variant always follows the same one and inherits its traces (caches,
    freed memory), which measurably favoured some variants over others. ``cycles`` names the
    callables whose steps differ in a cycle of k (``reweighter_every_5``: a weight update,
    then four plain weighted steps): each round runs them k times, each call in its own place
    of the shuffled order (k calls in a row would run beside themselves, which makes a step
    cheaper), and their sample is the cycle's mean.
    """
    device = torch.device(device)
    cycles = cycles or {}
    for step in steps.values():
        for _ in range(warmup):
            step()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in steps}
    order = [name for name in steps for _ in range(cycles.get(name, 1))]
    shuffle = random.Random(0).shuffle
    for _ in range(repeats):
        shuffle(order)
        elapsed = dict.fromkeys(steps, 0.0)
        for name in order:
            step = steps[name]
            start = time.perf_counter()
            step()
            _sync(device)
            elapsed[name] += time.perf_counter() - start
        for name, seconds in elapsed.items():
            samples[name].append(seconds * 1000 / cycles.get(name, 1))
    return {name: statistics.median(values) for name, values in samples.items()}


def time_pairwise(steps: dict[str, Callable[[], None]], repeats: int, reference: str = "plain",
                  device: torch.device | str = "cpu",
                  cycles: dict[str, int] | None = None) -> dict[str, float]:
    """Each callable's median time as a ratio to ``reference``'s, timed in pairs: for every
    other callable, :func:`time_interleaved` of the two alone (``reference``'s own ratio is 1).

    Interleaved with every variant, a fast step runs after slower, heavier ones (which, we
    think, leave the caches cold for it); beside the plain step alone it runs closer to how it
    would in a training loop of its own. On W1 that made the compiled steps 19-30 % cheaper
    relative to the plain step and moved the eager ones by less (at most 12 %, mostly a few
    percent, either way).
    """
    ratios = {reference: 1.0}
    for name, step in steps.items():
        if name != reference:
            medians = time_interleaved({reference: steps[reference], name: step}, repeats,
                                       device=device, cycles=cycles)
            ratios[name] = medians[name] / medians[reference]
    return ratios


_MEMORY_CHILD = """
import json, sys, torch
torch.set_num_threads(int(sys.argv[3]))
from metafair_opt.benchmark import (CYCLE_STEPS, make_step, make_workload, peak_live_mb,
                                    peak_rss_mb)
workload, variant, device = sys.argv[1], sys.argv[2], sys.argv[4]
step, _ = make_step(variant, make_workload(workload, device), device)
# One cycle of warm-up (a compiled variant compiles; any variant allocates its one-time state;
# meta_every=5 goes round once, so each measured step below updates the weights).
cycle = CYCLE_STEPS.get(variant, 1)
for _ in range(cycle):
    step()
peak_rss = None
if device == "cpu":
    peak_rss = peak_rss_mb(step)
    tracked = 2 * cycle - 1  # the RSS step and these: the measured step is a meta step again
else:
    tracked = 0  # the allocator's statistics need no recorded step: the next one is measured
print(json.dumps({"peak_rss_mb": peak_rss,
                  "peak_live_mb": peak_live_mb(step, device, tracked=tracked)}))
"""


def peak_rss_mb(step: Callable[[], None]) -> float:
    """Peak resident memory during one call of ``step`` above the process's just before it
    (MB of 2**20 bytes; Linux).

    Garbage and the allocator's free memory go back to the system first (so they can neither
    hide the step's peak nor count in it), then the kernel's peak (``VmHWM``) is reset to the
    current resident size through ``/proc/self/clear_refs``. Meant for a fresh process, as
    :func:`step_peak_memory_mb` runs it: in a long-lived one, memory the allocator keeps from
    earlier work can serve the step without showing.
    """
    import ctypes

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset the peak (VmHWM) to the current RSS
    step()
    return (_status_kb("VmHWM") - before) / 1024


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def step_peak_memory_mb(workload: str, variant: str, threads: int = 1,
                        device: torch.device | str = "cpu") -> dict[str, float | None]:
    """One step's peak memory above what the process held before it, in a fresh process (MB
    of 2**20 bytes).

    Returns ``{"peak_rss_mb": ..., "peak_live_mb": ...}``: the peak resident memory (Linux,
    read from /proc; None on CUDA, where the host's memory is not the step's) and the peak
    bytes of live tensors (:func:`peak_live_mb`). Both are measured after a warm-up step, and
    for ``reweighter_every_5`` on a weight-updating step. The process is new, so nothing
    measured before leaks into it. Raises a RuntimeError with the end of the process's error
    output if it fails.
    """
    import json
    import os
    import subprocess
    import sys

    device = torch.device(device)
    result = subprocess.run(
        [sys.executable, "-c", _MEMORY_CHILD, workload, variant, str(threads), str(device)],
        capture_output=True, text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if result.returncode != 0:
        raise RuntimeError(
            f"Measuring the memory of {workload}'s {variant!r} step in a fresh process failed "
            f"(exit status {result.returncode}); its error output ends with:\n"
            f"{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def memory_repeats(quick: bool) -> int:
    """Fresh processes per variant that :func:`run_suite` measures memory in."""
    return 1 if quick else MEMORY_REPEATS


def memory_caption(repeats: int) -> str:
    """How the memory figures of a results table were taken, for its header."""
    return (f"memory in MB of 2**20 bytes (MiB), each variant's median of {repeats} fresh "
            "process(es) (the RSS peaks' range in peak_rss_mb_min and peak_rss_mb_max)")


def measure_memory(workload: str, variants: Sequence[str], threads: int = 1,
                   device: torch.device | str = "cpu", repeats: int = MEMORY_REPEATS,
                   processes: int = MEMORY_PROCESSES,
                   progress: Callable[[str], None] | None = None,
                   ) -> dict[str, dict[str, float | None]]:
    """Each variant's :func:`step_peak_memory_mb` in ``repeats`` fresh processes, the median.

    The processes run in rounds (every variant once per round, ``processes`` at a time), so
    that a drift of the machine does not fall on one variant. Returns, per variant,
    ``peak_live_mb`` and ``peak_rss_mb`` (the medians; None on CUDA, which has no RSS of the
    step's) and ``peak_rss_mb_min`` and ``peak_rss_mb_max`` (the range of the processes'
    peaks). ``progress`` hears of each process's figures as they come. Raises the first
    process's RuntimeError should one fail.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1; got {repeats}.")
    jobs = [variant for _ in range(repeats) for variant in variants]
    runs: dict[str, list[dict[str, float | None]]] = {variant: [] for variant in variants}
    with ThreadPoolExecutor(processes) as pool:
        figures = pool.map(lambda variant: step_peak_memory_mb(
            workload, variant, threads, device), jobs)
        for variant, figure in zip(jobs, figures, strict=True):
            runs[variant].append(figure)
            if progress:
                progress(f"{workload} {variant}: {figure}")
    memory: dict[str, dict[str, float | None]] = {}
    for variant, measured in runs.items():
        live = [m["peak_live_mb"] for m in measured]
        rss = [m["peak_rss_mb"] for m in measured]
        known = [r for r in rss if r is not None]
        whole = len(known) == len(rss)  # None on CUDA
        memory[variant] = {
            "peak_live_mb": statistics.median(x for x in live if x is not None),
            "peak_rss_mb": statistics.median(known) if whole else None,
            "peak_rss_mb_min": min(known) if whole else None,
            "peak_rss_mb_max": max(known) if whole else None,
        }
    return memory


def peak_live_mb(step: Callable[[], None], device: torch.device | str = "cpu",
                 tracked: int = 1) -> float:
    """Peak bytes of live tensors during one call of ``step`` above those live before it (MB
    of 2**20 bytes).

    ``step`` runs ``tracked`` times, then once more measured. On CUDA the caching allocator's
    statistics (``torch.cuda.max_memory_allocated``) give the peak. On the CPU, where torch
    keeps no allocator statistics, ``torch.profiler`` records every allocation and free of the
    CPU allocator (``profile_memory=True``) and the peak of their running sum during the
    measured call is read off. The profiler only sees frees of blocks it saw allocated, so the
    ``tracked`` calls (at least one) are recorded too: the measured step's frees of what the
    step before it left behind (its gradients, say) are then counted.
    """
    device = torch.device(device)
    if device.type == "cuda":
        for _ in range(tracked):
            step()
        gc.collect()
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    if tracked < 1:
        raise ValueError("peak_live_mb on the CPU needs tracked >= 1: the measured step's "
                         "frees of the step before it are seen only if that step was recorded.")
    from torch.profiler import ProfilerActivity, profile, record_function

    marker = "metafair_opt.benchmark.measured_step"
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(tracked):
            step()
        gc.collect()
        with record_function(marker):
            step()
    return _peak_in_window(prof.profiler.kineto_results.events(), marker) / 2**20


def live_bytes_growth(step: Callable[[], None], first: int = 10, last: int = 200,
                      device: torch.device | str = "cpu") -> int:
    """Bytes of live tensors after ``last`` calls of ``step`` minus those after ``first``
    calls: 0 for a step that leaks nothing (tensors kept across steps, graphs chained from
    one step to the next, tensors growing in place).

    On CUDA the caching allocator's statistics (``torch.cuda.memory_allocated``) give the
    bytes, of the device's tensors only; on the CPU the running sum of ``torch.profiler``'s
    allocation and free records, recorded from the first call on, at the end of the two calls
    (each followed by a garbage collection, so that what it frees counts).
    """
    device = torch.device(device)
    if not 0 < first < last:
        raise ValueError(f"live_bytes_growth needs 0 < first < last; got {first}, {last}.")
    if device.type == "cuda":
        held = {}
        for call in range(1, last + 1):
            step()
            if call in (first, last):
                gc.collect()
                torch.cuda.synchronize(device)
                held[call] = torch.cuda.memory_allocated(device)
        return held[last] - held[first]
    from torch.profiler import ProfilerActivity, profile, record_function

    marker = "metafair_opt.benchmark.growth_call"
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for call in range(1, last + 1):
            if call in (first, last):
                with record_function(f"{marker}.{call}"):
                    step()
                    gc.collect()
            else:
                step()
    events = list(prof.profiler.kineto_results.events())
    records = _cpu_memory_records(events)

    def held_after(call: int) -> int:
        end = _window(events, f"{marker}.{call}")[1]
        return sum(nbytes for time_ns, nbytes in records if time_ns <= end)

    return held_after(last) - held_after(first)


def _window(events: Sequence[Any], marker: str) -> tuple[int, int]:
    """The start and end (ns) of the one profiler event named ``marker``."""
    window = [(e.start_ns(), e.start_ns() + e.duration_ns()) for e in events
              if e.name() == marker]
    if len(window) != 1:
        raise RuntimeError(f"Expected one profiler event {marker!r}, found {len(window)}.")
    return window[0]


def _cpu_memory_records(events: Sequence[Any]) -> list[tuple[int, int]]:
    """The profiler's CPU allocation (positive bytes) and free (negative bytes) records, as
    (time in ns, bytes), in time order."""
    from torch.autograd import DeviceType

    return sorted(((e.start_ns(), e.nbytes()) for e in events
                   if e.name() == "[memory]" and e.device_type() == DeviceType.CPU),
                  key=lambda record: record[0])


def _peak_in_window(events: Iterable[Any], marker: str) -> float:
    """The peak, during the event named ``marker``, of the running sum of the profiler's CPU
    allocation (positive bytes) and free (negative bytes) records, above its value at the
    marker's start (bytes)."""
    events = list(events)
    start, end = _window(events, marker)
    total = before = peak = 0
    for time_ns, nbytes in _cpu_memory_records(events):
        if time_ns > end:
            break
        total += nbytes
        if time_ns < start:
            before = peak = total
        else:
            peak = max(peak, total)
    return float(peak - before)


def run_suite(workloads: Iterable[str], device: torch.device | str = "cpu", quick: bool = False,
              progress: Callable[[str], None] | None = None, pairwise: bool = False,
              variants: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Check that every implementation agrees, measure memory, then time every variant of
    every workload (interleaved, one process).

    ``variants`` (None: all of :data:`VARIANTS`) picks the ones measured, the plain step
    always among them; only the comparisons of :data:`AGREEMENT_PAIRS` that involve one of
    them are checked. Raises :class:`ImplementationsDisagree`, before measuring anything,
    where two implementations of a step differ by more than :data:`AGREEMENT_TOLERANCE`
    (:func:`check_agreement`). With ``pairwise``, each record also holds
    ``ratio_to_plain_pairwise``: the variant timed against the plain step alone
    (:func:`time_pairwise`), with as many repeats again per pair. Memory is the median of
    :func:`memory_repeats` fresh processes per variant (:func:`measure_memory`).
    """
    chosen = VARIANTS
    checked_pairs = AGREEMENT_PAIRS
    if variants is not None:
        wanted = set(variants)
        unknown = sorted(wanted - set(VARIANTS))
        if unknown:
            raise ValueError(f"Unknown variant(s) {unknown}; choose from {list(VARIANTS)}.")
        chosen = tuple(v for v in VARIANTS if v in wanted or v == "plain")
        checked_pairs = tuple((ours, kept) for ours, others in AGREEMENT_PAIRS if (kept := tuple(
            other for other in others if ours in chosen or other in chosen)))
    device = torch.device(device)
    workloads = {name: make_workload(name, device) for name in workloads}
    agreements = {}
    for name, w in workloads.items():  # every workload's, before anything is measured
        if progress:
            progress(f"{name}: checking that every implementation agrees")
        agreements[name] = check_agreement(w, device, checked_pairs)
        disagreeing = {pair: gap for pair, gap in agreements[name].items()
                       if not gap <= AGREEMENT_TOLERANCE}  # NaN: nothing was compared
        if disagreeing:
            listed = "; ".join(f"{pair}: {gap:.3g}" for pair, gap in disagreeing.items())
            raise ImplementationsDisagree(
                f"{name}: implementations of the same step disagree (relative difference "
                f"above {AGREEMENT_TOLERANCE:g}): {listed}. Nothing was timed: a peer that "
                "disagrees is a bug to fix in the benchmark (or in our step), not a row to "
                "publish.")
    records: list[dict[str, Any]] = []
    for name, w in workloads.items():
        # Memory first (fresh processes): should one fail, no timing is lost.
        if progress:
            progress(f"{name}: measuring each variant's memory in fresh processes")
        memories = measure_memory(name, chosen, torch.get_num_threads(), device,
                                  repeats=memory_repeats(quick), progress=progress)
        steps = {variant: make_step(variant, w, device)[0] for variant in chosen}
        repeats = (10 if quick else 50) if name == "resnet18" else (30 if quick else 200)
        if progress:
            progress(f"{name}: timing {len(steps)} variants x {repeats} interleaved repeats")
        medians = time_interleaved(steps, repeats, device=device, cycles=CYCLE_STEPS)
        pairs: dict[str, float] = {}
        if pairwise:
            if progress:
                progress(f"{name}: timing each variant against the plain step alone")
            pairs = time_pairwise(steps, repeats, device=device, cycles=CYCLE_STEPS)
        for variant in chosen:
            records.append({
                "workload": name,
                "variant": variant,
                "median_ms": round(medians[variant], 4),
                "ratio_to_plain": round(medians[variant] / medians["plain"], 3),
                **({"ratio_to_plain_pairwise": round(pairs[variant], 3)} if pairs else {}),
                "peak_live_mb": significant(memories[variant]["peak_live_mb"]),
                **{key: significant(memories[variant][key]) for key in (
                    "peak_rss_mb", "peak_rss_mb_min", "peak_rss_mb_max")},
            })
        for pair, gap in agreements[name].items():
            records.append({"workload": name, "check": pair, "relative_difference": gap})
    return records


def significant(value: float | None, digits: int = 4) -> float | None:
    """``value`` rounded to ``digits`` significant figures (None stays None): memory figures
    span from W1's fractions of a megabyte to W2's gigabytes, which no fixed number of
    decimals serves."""
    return None if value is None else float(f"{value:.{digits}g}")


def machine_description(device: torch.device | str = "cpu") -> str:
    """Cores, CPU model, torch version and threads, GPU model on CUDA, and today's date."""
    import datetime
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = (f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}")
    if torch.device(device).type == "cuda":
        text += f", GPU {torch.cuda.get_device_name(device)}"
    return f"{text}; {datetime.date.today().isoformat()}"

