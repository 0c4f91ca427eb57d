"""Data-parallel meta-steps: the collectives both wrappers use under DistributedDataParallel.

A wrapper given a ``DistributedDataParallel`` model runs its meta-step functionally on the
underlying module (DDP's own gradient hooks never fire) and synchronises through a
:class:`Collectives` object. Outside DDP it uses :data:`LOCAL`, whose operations are identities,
so the single-process code path is the same code.

``sync="outer"``: each rank computes its meta-step on its own shard; only the final gradients
are averaged (one all-reduce per bucket of about 25 MB), and the reweighter's weight gradients
are exchanged so the weight table stays identical everywhere.

``sync="exact"``: the inner-step and look-ahead gradients, the reweighter's softmax normaliser
and the validation losses are also combined across ranks through differentiable collectives
(``torch.distributed.nn``), so a step on N ranks equals one step on the concatenated batches.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["LOCAL", "Collectives", "SyncMode", "init_from_environment", "per_rank_batch",
           "rank_and_world", "resolve_model"]

SyncMode = Literal["outer", "exact"]

# torch 2.15 marks torch.distributed.nn.functional deprecated in favour of the private
# torch.distributed._functional_collectives; the public functions still work, and this module
# keeps to public API, so their FutureWarning (one per call site and step) is silenced here only.
warnings.filterwarnings(
    "ignore", message=r"torch\.distributed\.nn\.functional\.all_(reduce|gather) is deprecated",
    category=FutureWarning,
)

#: Bucket size for the final gradient all-reduce (DistributedDataParallel's default).
BUCKET_BYTES = 25 * 2**20


class Collectives:
    """Cross-rank operations for one process group; identities for a single process."""

    def __init__(self, group: dist.ProcessGroup | None = None, sync: SyncMode = "outer") -> None:
        self.group = group
        self.sync: SyncMode = sync
        self.distributed = group is not None
        self.world_size = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0

    @property
    def exact(self) -> bool:
        return self.distributed and self.sync == "exact"

    # ------------------------------------------------------------ non-differentiable
    def gather_counts(self, counts: Sequence[int], device: torch.device) -> Tensor:
        """(world_size, len(counts)) table of every rank's ``counts``; one small collective."""
        local = torch.tensor([list(counts)], dtype=torch.long, device=device)
        if not self.distributed:
            return local
        out = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(out, local, group=self.group)
        return torch.cat(out)

    def gather(self, tensor: Tensor) -> Tensor:
        """Every rank's ``tensor`` (same shape on every rank), concatenated in rank order."""
        if not self.distributed:
            return tensor
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(out, tensor.contiguous(), group=self.group)
        return torch.cat(out)

    def sum(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed over ranks (not differentiable)."""
        if not self.distributed:
            return tensor
        tensor = tensor.detach().clone()
        dist.all_reduce(tensor, group=self.group)
        return tensor

    def max(self, value: Tensor) -> Tensor:
        if not self.distributed:
            return value
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group)
        return value

    def reduce_gradients(
        self, grads: Sequence[Tensor | None], params: Sequence[Tensor],
        extra: Tensor | None = None,
    ) -> tuple[list[Tensor], Tensor | None]:
        """Sum (``exact``: each rank's loss was already normalised over the global batch) or
        average (``outer``) ``grads`` across ranks, bucketed by size and dtype; ``extra`` (a
        small vector, e.g. finiteness sentinels) is summed alongside in float32 or wider.

        A parameter without a gradient on this rank (``None``: unused by this rank's data)
        counts as a zero gradient, so every rank builds the same buckets, as DDP does.
        """
        full = [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, params)]
        if not self.distributed:
            return full, extra
        scale = 1.0 if self.exact else 1.0 / self.world_size
        buckets: list[list[int]] = []
        size = 0
        for i, g in enumerate(full):
            nbytes = g.numel() * g.element_size()
            if (not buckets or size + nbytes > BUCKET_BYTES
                    or full[buckets[-1][0]].dtype != g.dtype):
                buckets.append([])
                size = 0
            buckets[-1].append(i)
            size += nbytes
        out = list(full)
        wide = (torch.float32, torch.float64)
        host = None
        if extra is not None:
            host = next((b for b in reversed(buckets) if full[b[0]].dtype in wide), None)
        for bucket in buckets:
            parts = [full[i].reshape(-1) for i in bucket]
            if bucket is host:
                parts.append(extra.detach().reshape(-1).to(full[bucket[0]].dtype))  # type: ignore[union-attr]
            flat = torch.cat(parts)
            dist.all_reduce(flat, group=self.group)
            offset = 0
            for i in bucket:
                out[i] = flat[offset:offset + full[i].numel()].view_as(full[i]) * scale
                offset += full[i].numel()
            if bucket is host:
                extra = flat[offset:].to(extra.dtype)  # type: ignore[union-attr]
        if extra is not None and host is None:  # no float32/64 gradients: reduce it alone
            extra = extra.detach().to(torch.float32).clone()
            dist.all_reduce(extra, group=self.group)
        return out, extra

    # ---------------------------------------------------------------- differentiable
    def sum_differentiable(self, tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """Sum ``tensors`` over ranks in one differentiable all-reduce (``exact`` only)."""
        if not self.exact:
            return tuple(tensors)
        from torch.distributed.nn.functional import all_reduce

        flat = all_reduce(torch.cat([t.reshape(-1) for t in tensors]), group=self.group)
        return tuple(part.view_as(t) for part, t in
                     zip(torch.split(flat, [t.numel() for t in tensors]), tensors))

    def softmax(self, logits: Tensor) -> Tensor:
        """Softmax over this rank's rows (``exact``: over the rows of every rank)."""
        if not self.exact:
            return torch.softmax(logits, dim=0)
        from torch.distributed.nn.functional import all_reduce

        exp = torch.exp(logits - self.max(logits.detach().max()))
        return exp / all_reduce(exp.sum(), group=self.group)

    def gather_differentiable(self, tensor: Tensor) -> Tensor:
        """Every rank's ``tensor`` concatenated, differentiably (``exact`` only).

        Every rank then computes the same function of the result; the backward sums the
        ranks' gradients, so divide that function by :attr:`world_size` before differentiating.
        """
        if not self.exact:
            return tensor
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(tensor.contiguous(), group=self.group))


#: The collectives of a single process.
LOCAL = Collectives()


def resolve_model(model: nn.Module, sync: SyncMode) -> tuple[nn.Module, Collectives]:
    """The module to run functionally and the collectives to synchronise with.

    A ``DistributedDataParallel`` model is unwrapped; its process group must be initialised.
    """
    if sync not in ("outer", "exact"):
        raise ValueError(f"sync must be 'outer' or 'exact'; got {sync!r}.")
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        return model, LOCAL
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "A DistributedDataParallel model was passed, but torch.distributed has no process "
            "group. Call torch.distributed.init_process_group() first (torchrun sets the "
            "environment it reads), or pass the unwrapped model for single-process training."
        )
    return model.module, Collectives(model.process_group, sync)


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size (0, 1 without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_environment(device_type: str = "cpu") -> tuple[int, int]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) initialise the default
    process group from the environment, gloo on the CPU and nccl on CUDA (each rank on GPU
    ``LOCAL_RANK``); then return (rank, world size). A single process gets (0, 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return rank_and_world()
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return rank_and_world()


def per_rank_batch(batch_size: int, world_size: int) -> int:
    """Each rank's share of a global batch; an error naming the nearest sizes that divide."""
    b, w = int(batch_size), int(world_size)
    if b % w:
        raise ValueError(
            f"The batch size {b} does not divide among {w} processes. Use a multiple of {w} "
            f"(for example --batch-size {b - b % w or w} or {b + w - b % w}), or another "
            "--nproc_per_node."
        )
    return b // w
