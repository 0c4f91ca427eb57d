"""Training the tabular methods: plain baseline, FaAlGrad and FORML, one shared loop.

Every method trains the same model with the same outer optimizer (Adam) on the same shuffled
mini-batches; only the step differs. After every epoch (or every ``eval_every`` steps) the
validation accuracy is measured and the best parameters are kept (model selection on the
validation split); test scores come from those parameters.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from metafair_opt.integrations.tabular.models import LOSSES, ModelSettings, build_mlp
from torch import Tensor

from metafair_opt import (
    ByGroup,
    ByGroupAndLabel,
    GradientAlignmentWrapper,
    GroupBalancedBatchSampler,
    Proportion,
    SampleReweighter,
)
from metafair_opt.datasets import TabularDataset, standardize, train_val_test_split
from metafair_opt.distributed import per_rank_batch, rank_and_world
from metafair_opt.splits import SplitStrategy

__all__ = ["MethodSpec", "Splits", "TrainedScores", "make_splits", "parse_ratio", "train"]


@dataclass(frozen=True)
class Splits:
    """Standardised train/validation/test tensors (float32 inputs, 0/1 labels, group ids)."""

    x: dict[str, Tensor]
    y: dict[str, Tensor]
    group: dict[str, Tensor]

    @property
    def in_features(self) -> int:
        return self.x["train"].shape[1]


def make_splits(ds: TabularDataset, seed: int,
                fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)) -> Splits:
    """The paper's 70/15/15 split, stratified on (group, label), standardised on train."""
    parts = standardize(*train_val_test_split(ds, fractions, seed=seed))
    names = ("train", "val", "test")
    return Splits(
        x={n: torch.tensor(p.X.to_numpy(), dtype=torch.float32) for n, p in zip(names, parts)},
        y={n: torch.tensor(p.y.to_numpy()) for n, p in zip(names, parts)},
        group={n: torch.tensor(p.group.to_numpy()) for n, p in zip(names, parts)},
    )


def parse_ratio(ratio: str) -> float:
    """``"80:20"`` (X_q:X_s, as in the paper) -> support fraction 0.2."""
    try:
        query, support = (float(v) for v in ratio.split(":"))
    except ValueError as error:
        raise ValueError(f"A split ratio looks like 80:20 (X_q:X_s); got {ratio!r}.") from error
    if query <= 0 or support <= 0:
        raise ValueError(f"Both parts of a split ratio must be positive; got {ratio!r}.")
    return support / (query + support)


@dataclass(frozen=True)
class MethodSpec:
    """One trained method: ``kind`` is ``baseline``, ``faalgrad`` or ``forml``.

    FaAlGrad: ``config`` 1 (by group) or 2 (by group and label), ``inner_steps``, an optional
    X_q:X_s ``split_ratio`` (section 5.5, implies config 1's grouping) and ``swap`` (section 5.6).
    FORML: ``weight_lr``, ``weight_optimizer``, ``meta_loss`` and ``val_rows`` (``"all"`` or
    ``"negatives"``: a validation batch of true negatives makes the loss discrepancy a proxy
    for the false-positive-rate gap).
    """

    kind: str
    config: int = 1
    inner_steps: int = 1
    inner_lr: float | None = None
    split_ratio: str | None = None
    swap: bool = False
    weight_lr: float = 0.01
    weight_optimizer: str = "adam"
    meta_loss: str = "mean_loss_discrepancy"
    val_rows: str = "all"

    @property
    def label(self) -> str:
        """A short name for result tables."""
        if self.kind == "faalgrad":
            parts = [f"faalgrad c{self.config}" if self.split_ratio is None
                     else f"faalgrad {self.split_ratio}", f"I={self.inner_steps}"]
            if self.swap:
                parts.append("swap")
            if self.inner_lr is not None:
                parts.append(f"lr_in={self.inner_lr:g}")
            return " ".join(parts)
        if self.kind == "forml":
            text = f"forml {self.weight_optimizer} w_lr={self.weight_lr:g}"
            if self.meta_loss != "mean_loss_discrepancy":
                text += f" {self.meta_loss}"
            return text + (" val=negatives" if self.val_rows == "negatives" else "")
        return self.kind

    def split(self, settings: ModelSettings, seed: int) -> SplitStrategy:
        """The X_s / X_q split strategy of this FaAlGrad variant."""
        support_group = 0 if self.swap else 1
        if self.split_ratio is not None:
            return Proportion(parse_ratio(self.split_ratio), support_group=support_group,
                              seed=seed, strict=False)
        if self.config == 1:
            return ByGroup(support_group=support_group)
        if self.config == 2:
            cells = settings.config2_cells
            if self.swap:
                cells = tuple((g, 1 - label) for g, label in cells)
            return ByGroupAndLabel(support_cells=list(cells))
        raise ValueError(f"FaAlGrad config must be 1 or 2; got {self.config}.")


@dataclass
class TrainedScores:
    """Logit scores of the selected model on validation and test rows, and its history."""

    val: np.ndarray
    test: np.ndarray
    best_epoch: int
    val_accuracy: list[float]
    alignment: list[float]
    weights: np.ndarray | None = None
    #: Batches in which a split ratio could not be met and X_s took the whole support group.
    clipped_batches: int = 0


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    order = torch.randperm(n, generator=generator)
    yield from order.split(batch_size)


def _scores(model: torch.nn.Module, x: Tensor) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        out = model(x).reshape(-1).numpy().copy()
    model.train()
    return out


def train(
    spec: MethodSpec,
    data: Splits,
    settings: ModelSettings,
    seed: int,
    epochs: int | None = 20,
    steps: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    selection: str = "best",
) -> TrainedScores:
    """Train ``spec`` on ``data`` and return validation/test scores of the selected model.

    Give ``epochs`` (evaluate after each) or ``steps`` (evaluate every 1/20 of them).
    ``selection="best"`` keeps the evaluation with the highest validation accuracy;
    ``"last"`` keeps the final parameters (the FORML paper's choice for FORML, which already
    optimises against the validation set). ``progress(done, total)`` is called after each
    evaluation.
    """
    if selection not in ("best", "last"):
        raise ValueError(f"selection must be 'best' or 'last'; got {selection!r}.")
    rank, world = rank_and_world()
    per_rank_batch(settings.batch_size, world)  # refuses a batch the ranks cannot share
    torch.manual_seed(seed)
    module = build_mlp(data.in_features, settings.hidden, settings.activation)
    optimizer = torch.optim.Adam(module.parameters(), lr=settings.outer_lr)
    # Under torchrun: DDP (parameters broadcast from rank 0); every rank walks the same global
    # batches and takes every world-th row of each, so ranks hold equal shares.
    model = torch.nn.parallel.DistributedDataParallel(module) if world > 1 else module
    loss_fn = LOSSES[settings.loss]
    x, y, g = data.x["train"], data.y["train"], data.group["train"]
    n = x.shape[0]
    batches_per_epoch = -(-n // settings.batch_size) if world == 1 else n // settings.batch_size
    total_steps = steps if steps is not None else (epochs or 1) * batches_per_epoch
    evals = 20 if steps is not None else (epochs or 1)
    eval_every = max(1, total_steps // evals)

    step_fn, reweighter, split = _step_function(spec, model, optimizer, loss_fn, data, settings,
                                                seed, rank, world)
    order = torch.Generator().manual_seed(seed)
    best = (-1.0, 0, copy.deepcopy(module.state_dict()))
    history: list[float] = []
    alignment: list[float] = []
    done = 0
    while done < total_steps:
        for rows in _batches(n, settings.batch_size, order):
            if world > 1:
                if rows.numel() < settings.batch_size:
                    continue  # a last short batch would not divide evenly among the ranks
                rows = rows[rank::world]
            value = step_fn(x[rows], y[rows], g[rows], rows)
            if value is not None:
                alignment.append(value)
            done += 1
            if done % eval_every == 0 or done == total_steps:
                predicted = _scores(module, data.x["val"]) > 0
                accuracy = float((predicted == data.y["val"].numpy().astype(bool)).mean())
                history.append(accuracy)
                if accuracy > best[0] or selection == "last":
                    best = (accuracy, len(history), copy.deepcopy(module.state_dict()))
                if progress is not None:
                    progress(len(history), -(-total_steps // eval_every))
            if done == total_steps:
                break
    module.load_state_dict(best[2])
    weights = None
    if reweighter is not None:
        weights = (torch.softmax(reweighter.weights, 0) * reweighter.num_samples).numpy()
    return TrainedScores(
        val=_scores(module, data.x["val"]),
        test=_scores(module, data.x["test"]),
        best_epoch=best[1],
        val_accuracy=history,
        alignment=alignment,
        weights=weights,
        clipped_batches=int(getattr(split, "clipped", 0)),
    )


StepFn = Callable[[Tensor, Tensor, Tensor, Tensor], "float | None"]


def _step_function(spec, model, optimizer, loss_fn, data, settings, seed, rank=0, world=1):
    """A closure doing one training step of ``spec``, its reweighter and its split (or None)."""
    if spec.kind == "baseline":
        def plain(xb, yb, gb, rows):
            optimizer.zero_grad()
            loss_fn(model(xb), yb).backward()
            optimizer.step()
            return None
        return plain, None, None

    if spec.kind == "faalgrad":
        aligner = GradientAlignmentWrapper(
            model, optimizer, loss_fn=loss_fn,
            inner_lr=spec.inner_lr if spec.inner_lr is not None else settings.inner_lr,
            inner_steps=spec.inner_steps, track_alignment=spec.inner_steps > 0,
            on_empty="fallback",
        )
        split = spec.split(settings, seed)

        def aligned(xb, yb, gb, rows):
            aligner.zero_grad()
            result = aligner.step_batch(xb, yb, gb, split=split)
            return result.alignment
        return aligned, None, split

    if spec.kind == "forml":
        reweighter = SampleReweighter(
            model, optimizer, num_samples=data.x["train"].shape[0], loss_fn=loss_fn,
            meta_loss=spec.meta_loss, weight_lr=spec.weight_lr,
            weight_optimizer=spec.weight_optimizer,  # type: ignore[arg-type]
        )
        xv, yv, gv = data.x["val"], data.y["val"], data.group["val"]
        if spec.val_rows == "negatives":
            keep = yv == 0
            xv, yv, gv = xv[keep], yv[keep], gv[keep]
        elif spec.val_rows != "all":
            raise ValueError(f"val_rows must be 'all' or 'negatives'; got {spec.val_rows!r}.")
        groups = int(torch.unique(gv).numel())
        batch = min(settings.batch_size // world,
                    GroupBalancedBatchSampler.smallest_share(gv, world))
        sampler = GroupBalancedBatchSampler(
            gv, batch_size=batch, min_per_group=max(1, min(20, batch // (2 * groups))),
            num_batches=10**9, seed=seed, rank=rank, world_size=world,
        )
        val_batches = iter(sampler)

        def reweighted(xb, yb, gb, rows):
            vi = next(val_batches)
            reweighter.zero_grad()
            reweighter.step(xb, yb, rows, val=(xv[vi], yv[vi], gv[vi]))
            return None
        return reweighted, reweighter, None

    raise ValueError(f"Unknown method kind {spec.kind!r}: use baseline, faalgrad or forml.")
