"""One rank of the distributed tests (tests/test_distributed.py starts two of these).

Usage: python distributed_worker.py SCENARIO RANK WORLD_SIZE INIT_FILE OUT_DIR

Every scenario builds the same float64 data as the test (``shard_data``), wraps the model in
DistributedDataParallel over gloo, runs a few steps and saves what the test compares.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from metafair_opt import GradientAlignmentWrapper, SampleReweighter

STEPS = 3
ROWS_PER_RANK = 8
NUM_SAMPLES = 40


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2)).double()


def shard_data(step: int, rank: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s batch at ``step``: rows, labels, groups, table indices, validation."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(ROWS_PER_RANK, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (ROWS_PER_RANK,), generator=g)
    groups = torch.tensor([0, 1] * (ROWS_PER_RANK // 2))
    # Overlapping index ranges: some rows appear on both ranks in a step.
    idx = torch.randperm(NUM_SAMPLES // 2, generator=g)[:ROWS_PER_RANK] + rank * 6
    xv = torch.randn(6, 5, generator=g, dtype=torch.float64)
    yv = torch.randint(0, 2, (6,), generator=g)
    gv = torch.tensor([0, 1, 0, 1, 0, 1])
    return {"x": x, "y": y, "groups": groups, "idx": idx, "xv": xv, "yv": yv, "gv": gv}


class TwoHeads(nn.Module):
    """Each batch uses one head, chosen by its data: under DDP the ranks can differ in which
    parameters have a gradient at all."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.a, self.b = nn.Linear(5, 8), nn.Linear(8, 2), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.body(x))
        return self.a(hidden) if bool(x[0, 0] > 0) else self.b(hidden)


def make_wrapper(kind: str, model: nn.Module, optimizer, sync: str = "outer",
                 weight_grad_mode: str = "auto", recompute: bool = False):
    """``recompute``: the alignment wrapper's ``recompute_support``, the reweighter's
    ``recompute_forward``."""
    if kind == "alignment":
        return GradientAlignmentWrapper(model, optimizer, F.cross_entropy, inner_lr=0.3,
                                        inner_steps=2, sync=sync, recompute_support=recompute)
    return SampleReweighter(model, optimizer, num_samples=NUM_SAMPLES, loss_fn=F.cross_entropy,
                            meta_loss="max_loss_discrepancy", weight_lr=0.2,
                            lookahead_lr=0.5, sync=sync, weight_grad_mode=weight_grad_mode,
                            recompute_forward=recompute)


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)


def run_step(kind: str, wrapper, data: dict[str, torch.Tensor]):
    if kind == "alignment":
        support = data["groups"] == 1
        return wrapper.step((data["x"][support], data["y"][support]),
                            (data["x"][~support], data["y"][~support]))
    return wrapper.step(data["x"], data["y"], data["idx"],
                        val=(data["xv"], data["yv"], data["gv"]))


def main() -> None:
    scenario, rank, world, init_file, out = sys.argv[1:6]
    rank, world = int(rank), int(world)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        kind, sync = scenario.split("-")[:2]
        if scenario.endswith("unused"):
            torch.manual_seed(0)
            base: nn.Module = TwoHeads().double()
        else:
            base = make_model()
        model = nn.parallel.DistributedDataParallel(base)
        optimizer = make_optimizer(model.module)
        parts = scenario.split("-")
        mode = ("forward" if kind == "reweighter" and ("forward" in parts or "recompute" in parts)
                else "auto")
        wrapper = make_wrapper(kind, model, optimizer, sync, mode, "recompute" in parts)
        record: dict = {}
        if scenario.endswith("unused"):
            for step in range(STEPS):
                data = shard_data(step, rank)
                data["x"][:, 0] = 1.0 if rank == 0 else -1.0  # rank 0 uses head a, rank 1 b
                wrapper.zero_grad()
                run_step(kind, wrapper, data)
            record["params"] = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
        elif scenario.endswith(("unequal", "badindex", "empty")):
            data = shard_data(0, rank)
            if rank == 1 and scenario.endswith(("unequal", "empty")):
                rows = 6 if scenario.endswith("unequal") else 0
                data = {k: (v[:rows] if k in ("x", "y", "groups", "idx") else v)
                        for k, v in data.items()}
            elif rank == 1:
                data["idx"][2] = NUM_SAMPLES + 3
            try:
                run_step(kind, wrapper, data)
            except (ValueError, IndexError) as error:
                record["error"] = str(error)
        elif scenario.endswith("nan"):
            data = shard_data(0, rank)
            if rank == 1:
                data["x"][0, 0] = float("nan")
            before = [p.detach().clone() for p in model.parameters()]
            try:
                run_step(kind, wrapper, data)
            except FloatingPointError as error:
                record["error"] = str(error)
            record["unchanged"] = all(torch.equal(a, p) for a, p in
                                      zip(before, model.parameters()))
        else:
            for step in range(STEPS):
                wrapper.zero_grad()
                result = run_step(kind, wrapper, shard_data(step, rank))
            record["params"] = [p.detach().clone() for p in model.module.parameters()]
            if kind == "reweighter":
                record["batch_weights"] = result.batch_weights.clone()
                record["weights"] = wrapper.weights.clone()
                record["ema"] = wrapper.to_frame()["ema_weighted_loss"].to_numpy()
            if rank == 0:  # one checkpoint, written once
                torch.save({"model": model.module.state_dict(), "wrapper": wrapper.state_dict()},
                           Path(out) / "checkpoint.pt")
        torch.save(record, Path(out) / f"rank{rank}.pt")
        # Both ranks done before either tears gloo down: a rank that exits while its peer still
        # talks to it can abort in gloo's threads ("terminate called without an active
        # exception", seen once under load).
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
