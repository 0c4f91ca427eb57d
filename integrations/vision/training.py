"""Image training with fair reweighting or gradient alignment: ResNet-18 on CIFAR, CelebA and
colored digits, with per-epoch atomic checkpoints and exact resumption.

The papers' settings are the defaults (FORML sections 4.2.2 and 4.3.2): CIFAR trains with SGD,
Nesterov momentum 0.9, learning rate 0.1 decayed by 0.1 at 30 %, 60 % and 80 % of the epochs
(60/120/160 of 200), weight decay 5e-4, batches of 128, and FORML minimises the max loss
discrepancy between classes; CelebA trains with Adam at 0.001, batches of 256 for 10 epochs, and
FORML minimises the mean loss discrepancy between the sensitive groups.

Determinism: every epoch reseeds the data order, the augmentation and the validation sampler
from ``(seed, epoch)``, so a run resumed from the checkpoint of epoch k continues exactly as an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from metafair_opt.integrations.vision.data import celeba, cifar, colored_digits
from metafair_opt.integrations.vision.models import build_resnet18
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from metafair_opt import (
    ByGroup,
    GradientAlignmentWrapper,
    GroupBalancedBatchSampler,
    RoundRobin,
    SampleReweighter,
)
from metafair_opt.distributed import init_from_environment, per_rank_batch, rank_and_world
from metafair_opt.metrics import binary_fairness_report, class_fairness_report

__all__ = ["DATASET_DEFAULTS", "VisionConfig", "build_datasets", "train_vision"]

#: The papers' settings per data set (see the module docstring).
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "cifar10": {"optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4, "epochs": 200,
                "batch_size": 128, "meta_loss": "max_loss_discrepancy", "min_per_group": 3,
                "small_input": True, "class_groups": True},
    "cifar100": {"optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4, "epochs": 200,
                 "batch_size": 128, "meta_loss": "max_loss_discrepancy", "min_per_group": 3,
                 "small_input": True, "class_groups": True},
    "celeba": {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "epochs": 10,
               "batch_size": 256, "meta_loss": "mean_loss_discrepancy", "min_per_group": 20,
               "small_input": False, "class_groups": False},
    "colored-digits": {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "epochs": 8,
                       "batch_size": 64, "meta_loss": "mean_loss_discrepancy",
                       "min_per_group": 16, "small_input": True, "class_groups": False},
}


@dataclass
class VisionConfig:
    """One image-training run. ``None`` fields take the data set's defaults."""

    dataset: str = "colored-digits"
    method: str = "baseline"
    root: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    optimizer: str | None = None
    weight_decay: float | None = None
    meta_loss: str | None = None
    min_per_group: int | None = None
    weight_lr: float = 0.01
    recompute_forward: bool = False
    recompute_support: bool = False
    inner_lr: float = 0.01
    inner_steps: int = 1
    device: str = "auto"
    amp: bool = False
    amp_dtype: str = "auto"
    channels_last: bool = False
    workers: int = 0
    seed: int = 0
    max_steps_per_epoch: int | None = None
    checkpoint: str | None = None
    resume: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> VisionConfig:
        """A copy with every ``None`` replaced by the data set's default."""
        if self.dataset not in DATASET_DEFAULTS:
            raise ValueError(f"Unknown image data set {self.dataset!r}; choose from "
                             f"{sorted(DATASET_DEFAULTS)}.")
        if self.method not in ("baseline", "forml", "faalgrad"):
            raise ValueError(f"method must be baseline, forml or faalgrad; got {self.method!r}.")
        if self.recompute_forward and self.method != "forml":
            raise ValueError(
                f"recompute_forward applies to FORML's reweighter only; method={self.method!r} "
                "has no training forward to recompute. Drop --recompute-forward or use "
                "--method forml."
            )
        if self.recompute_support and self.method != "faalgrad":
            raise ValueError(
                f"recompute_support applies to FaAlGrad's alignment wrapper only; "
                f"method={self.method!r} has no support set to recompute. Drop "
                "--recompute-support or use --method faalgrad."
            )
        defaults = DATASET_DEFAULTS[self.dataset]
        values = {k: (defaults[k] if getattr(self, k) is None and k in defaults else
                      getattr(self, k)) for k in asdict(self)}
        return replace(self, **values)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device.")
    return torch.device(name)


def build_datasets(cfg: VisionConfig) -> tuple[Any, Any, Any, int]:
    """(train, val, test, number of classes) for ``cfg.dataset``; items are (x, y, group, i)."""
    if cfg.dataset == "colored-digits":
        parts = [colored_digits(split, seed=cfg.extra.get("data_seed", 0),
                                image_size=cfg.extra.get("image_size", 32))
                 for split in ("train", "val", "test")]
        return (*parts, 2)
    if cfg.root is None:
        raise ValueError(f"--root is required for {cfg.dataset}: the folder holding the data.")
    if cfg.dataset in ("cifar10", "cifar100"):
        parts = [cifar(cfg.root, name=cfg.dataset, split=split)
                 for split in ("train", "val", "test")]
        return (*parts, 10 if cfg.dataset == "cifar10" else 100)
    parts = [celeba(cfg.root, target=cfg.extra.get("target", "Attractive"),
                    sensitive=cfg.extra.get("sensitive", "Male"), split=split,
                    image_size=cfg.extra.get("image_size", 128))
             for split in ("train", "valid", "test")]
    return (*parts, 2)


AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def amp_dtype(cfg: VisionConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a run: None without ``amp``; ``auto`` is float16 (with a gradient
    scaler) on CUDA and bfloat16 (no scaler needed) on the CPU."""
    if not cfg.amp:
        return None
    if cfg.amp_dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    if cfg.amp_dtype not in AMP_DTYPES:
        raise ValueError(f"amp_dtype must be auto, bfloat16 or float16; got {cfg.amp_dtype!r}.")
    return AMP_DTYPES[cfg.amp_dtype]


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


class _Run:
    """The objects of one training run and the step of its method."""

    def __init__(self, cfg: VisionConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.rank, self.world = rank_and_world()
        self.local_batch = per_rank_batch(int(cfg.batch_size), self.world)
        self.amp_dtype = amp_dtype(cfg, device)
        # float16 needs loss scaling; the wrappers take the scaler and step through it.
        self.scaler = (torch.amp.GradScaler(device.type) if self.amp_dtype == torch.float16
                       else None)
        self.train_set, self.val_set, self.test_set, self.num_classes = build_datasets(cfg)
        torch.manual_seed(cfg.seed)
        model = build_resnet18(self.num_classes, small_input=DATASET_DEFAULTS[cfg.dataset][
            "small_input"])
        self.memory_format = torch.channels_last if cfg.channels_last else torch.preserve_format
        # module: the network itself (checkpointed, evaluated); model: what trains, the module or
        # under torchrun its DistributedDataParallel (parameters broadcast from rank 0).
        self.module = model.to(device=device, memory_format=self.memory_format)
        self.model: nn.Module = self.module
        if self.world > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.module, device_ids=[device.index or 0] if device.type == "cuda" else None)
        if cfg.optimizer == "sgd":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(
                self.module.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True,
                weight_decay=cfg.weight_decay)
        else:
            self.optimizer = torch.optim.Adam(self.module.parameters(), lr=cfg.lr,
                                              weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=self._milestones(), gamma=0.1)
        self.wrapper: Any = None
        if cfg.method == "forml":
            self.wrapper = SampleReweighter(self.model, self.optimizer,
                                            num_samples=len(self.train_set),
                                            loss_fn=F.cross_entropy, meta_loss=cfg.meta_loss,
                                            weight_lr=cfg.weight_lr,
                                            recompute_forward=cfg.recompute_forward,
                                            grad_scaler=self.scaler)
        elif cfg.method == "faalgrad":
            self.wrapper = GradientAlignmentWrapper(self.model, self.optimizer,
                                                    loss_fn=F.cross_entropy,
                                                    inner_lr=cfg.inner_lr,
                                                    inner_steps=cfg.inner_steps,
                                                    on_empty="fallback",
                                                    grad_scaler=self.scaler,
                                                    recompute_support=cfg.recompute_support)
            group_ids = sorted(torch.unique(self.train_set.groups).tolist())
            self.split: Any = (ByGroup(support_group=1) if group_ids == [0, 1]
                               else RoundRobin(groups=group_ids))
        self.epoch = 0

    def _milestones(self) -> list[int]:
        """Step decay at 30, 60 and 80 % of the epochs (60/120/160 of 200) for SGD."""
        epochs = int(self.cfg.epochs or 1)
        return [round(epochs * f) for f in (0.3, 0.6, 0.8)] if self.cfg.optimizer == "sgd" else []

    # ---------------------------------------------------------------- data for one epoch
    def _loader(self, epoch: int) -> DataLoader:
        if self.world > 1:  # each rank its own share of the epoch's permutation
            sampler = DistributedSampler(self.train_set, num_replicas=self.world, rank=self.rank,
                                         shuffle=True, seed=_epoch_seed(self.cfg.seed, epoch),
                                         drop_last=True)
            return DataLoader(self.train_set, batch_size=self.local_batch, sampler=sampler,
                              drop_last=True, num_workers=self.cfg.workers,
                              pin_memory=self.device.type == "cuda")
        generator = torch.Generator().manual_seed(_epoch_seed(self.cfg.seed, epoch))
        return DataLoader(self.train_set, batch_size=self.cfg.batch_size, shuffle=True,
                          drop_last=True, num_workers=self.cfg.workers, generator=generator,
                          pin_memory=self.device.type == "cuda")

    def _val_batches(self, epoch: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        groups = self.val_set.groups
        n_groups = int(torch.unique(groups).numel())
        per_group = int(self.cfg.min_per_group)
        batch = max(self.local_batch, n_groups * per_group)
        share = GroupBalancedBatchSampler.smallest_share(groups, self.world)
        sampler = GroupBalancedBatchSampler(groups, batch_size=min(batch, share),
                                            min_per_group=per_group, num_batches=10**9,
                                            seed=_epoch_seed(self.cfg.seed, epoch),
                                            rank=self.rank, world_size=self.world)
        loader = DataLoader(self.val_set, batch_sampler=sampler, num_workers=self.cfg.workers)
        for x, y, g, _ in loader:
            yield x, y, g

    def _to(self, x: Tensor) -> Tensor:
        return x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)

    # --------------------------------------------------------------------------- epochs
    def train_epoch(self, quiet: bool) -> float:
        epoch = self.epoch
        torch.manual_seed(_epoch_seed(self.cfg.seed, epoch))  # augmentation draws
        val_batches = self._val_batches(epoch) if self.cfg.method == "forml" else None
        self.model.train()
        losses = []
        loader = self._loader(epoch)
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", leave=False,
                   disable=quiet, unit="batch")
        for step, (x, y, g, idx) in enumerate(bar):
            if self.cfg.max_steps_per_epoch is not None and step >= self.cfg.max_steps_per_epoch:
                break
            x, y, g = self._to(x), y.to(self.device), g.to(self.device)
            with _autocast(self.device, self.amp_dtype):
                losses.append(self._step(x, y, g, idx, val_batches))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        self.scheduler.step()
        self.epoch += 1
        return float(np.mean(losses)) if losses else float("nan")

    def _step(self, x: Tensor, y: Tensor, g: Tensor, idx: Tensor, val_batches) -> float:
        if self.cfg.method == "baseline":
            self.optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(self.model(x).float(), y)
            if self.scaler is None:
                loss.backward()
                self.optimizer.step()
            else:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            return float(loss.detach())
        self.wrapper.zero_grad()
        if self.cfg.method == "forml":
            xv, yv, gv = next(val_batches)
            result = self.wrapper.step(x, y, idx, val=(self._to(xv), yv.to(self.device),
                                                       gv.to(self.device)))
            return result.loss
        result = self.wrapper.step_batch(x, y, g, split=self.split)
        return float(result.query_loss) if result.query_loss is not None else float("nan")

    @torch.no_grad()
    def predict(self, dataset: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self.module.eval()
        labels, predictions, groups = [], [], []
        loader = DataLoader(dataset, batch_size=256, shuffle=False, num_workers=self.cfg.workers)
        for x, y, g, _ in loader:
            with _autocast(self.device, self.amp_dtype):
                logits = self.module(self._to(x))
            predictions.append(logits.float().argmax(1).cpu().numpy())
            labels.append(y.numpy())
            groups.append(g.numpy())
        self.module.train()
        return np.concatenate(labels), np.concatenate(predictions), np.concatenate(groups)

    # ---------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "wrapper": None if self.wrapper is None else self.wrapper.state_dict(),
            "split": getattr(getattr(self, "split", None), "state_dict", lambda: None)(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "amp_resolved": str(self.amp_dtype),
            "config": asdict(self.cfg),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        current = asdict(self.cfg)
        saved = state.get("config", {})
        differing = {k: (saved[k], current[k]) for k in saved
                     if k not in _RESUMABLE_CHANGES and saved[k] != current.get(k)}
        # amp_dtype="auto" depends on the device, so compare the dtype the run used; checkpoints
        # older than float16 support trained --amp in bfloat16.
        saved_amp = state.get("amp_resolved",
                              str(torch.bfloat16 if saved.get("amp") else None))
        if saved_amp != str(self.amp_dtype):
            differing["autocast dtype"] = (saved_amp, str(self.amp_dtype))
        if differing:
            raise ValueError(
                "The checkpoint was written by a run with other settings (saved, now): "
                f"{differing}. Resume with the same settings, or start a new run."
            )
        self.module.load_state_dict(state["model"])
        if self.wrapper is not None:
            self.wrapper.load_state_dict(state["wrapper"])  # holds the optimizer state too
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # The schedule follows the current --epochs (a run may be extended when resumed).
        self.scheduler.milestones = Counter(self._milestones())
        if state.get("split") is not None:
            self.split.load_state_dict(state["split"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])


#: Settings that may differ between a run and its resumption.
_RESUMABLE_CHANGES = {"epochs", "resume", "checkpoint", "workers", "device", "quiet",
                      # the same steps, computed with less memory:
                      "recompute_forward", "recompute_support",
                      "amp_dtype"}  # compared as the resolved autocast dtype instead


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, temporary)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def train_vision(cfg: VisionConfig, quiet: bool = False) -> tuple[dict[str, float], nn.Module]:
    """Train one configuration to the end (resuming if asked) and return test metrics."""
    cfg = cfg.resolved()
    device = resolve_device(cfg.device)
    init_from_environment(device.type)  # under torchrun: the process group, gloo or nccl
    if device.type == "cuda" and rank_and_world()[1] > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    run = _Run(cfg, device)
    quiet = quiet or run.rank > 0
    checkpoint = Path(cfg.checkpoint) / "last.pt" if cfg.checkpoint else None
    if cfg.resume:
        if checkpoint is None or not checkpoint.is_file():
            raise FileNotFoundError(f"--resume needs a checkpoint at {checkpoint}; none found.")
        run.load_state_dict(torch.load(checkpoint, map_location=device, weights_only=False))
    epochs = tqdm(range(run.epoch, int(cfg.epochs or 1)), desc=f"{cfg.dataset} {cfg.method}",
                  disable=quiet, unit="epoch", initial=run.epoch, total=cfg.epochs)
    for _ in epochs:
        loss = run.train_epoch(quiet)
        epochs.set_postfix(loss=f"{loss:.3f}")
        if checkpoint is not None and run.rank == 0:  # one writer; the others wait for it
            save_checkpoint(run.state_dict(), checkpoint)
        if checkpoint is not None and run.world > 1:
            torch.distributed.barrier()
    y, predicted, groups = run.predict(run.test_set)
    if DATASET_DEFAULTS[cfg.dataset]["class_groups"]:
        metrics = class_fairness_report(y, predicted)
    else:
        metrics = binary_fairness_report(y, predicted, groups)
    return metrics, run.module
