"""Step time of both wrappers on the MLP workload (W1) at one and two processes, in one run.

    python benchmarks/distributed_scaling.py [--steps 200] [--rounds 3] [--sync outer|exact]

The global batch is W1's (256 rows, 80 of them X_s; a validation batch of 64): one process takes
all of it; two processes (gloo, DistributedDataParallel) take every second training row and half
of the validation batch each. Each
configuration runs in fresh processes with one torch thread per process; rank 0 reports the
median step time. Prints a Markdown table with the ratio of two processes to one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from metafair_opt import GradientAlignmentWrapper, SampleReweighter
from metafair_opt.benchmark import INNER_LR, LOOKAHEAD_LR, WEIGHT_LR, make_workload


def rank_main(kind: str, sync: str, steps: int, rank: int, world: int, init: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank,
                                world_size=world)
    w = make_workload("mlp")
    model: nn.Module = w.model(torch.device("cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model)
    mine = torch.arange(rank, w.x.shape[0], world)
    x, y, support = w.x[mine], w.y[mine], w.support[mine]
    share = w.x_val.shape[0] // world  # contiguous: W1's validation groups alternate by row
    val_rows = torch.arange(rank * share, (rank + 1) * share)
    val = (w.x_val[val_rows], w.y_val[val_rows], w.g_val[val_rows])
    if kind == "alignment":
        wrapper = GradientAlignmentWrapper(model, optimizer, loss_fn=w.loss, inner_lr=INNER_LR,
                                           sync=sync)

        def step() -> None:
            wrapper.zero_grad()
            wrapper.step((x[support], y[support]), (x[~support], y[~support]))
    else:
        wrapper = SampleReweighter(model, optimizer, num_samples=w.x.shape[0], loss_fn=w.loss,
                                   weight_optimizer="sgd", weight_lr=WEIGHT_LR,
                                   lookahead_lr=LOOKAHEAD_LR, sync=sync)

        def step() -> None:
            wrapper.zero_grad()
            wrapper.step(x, y, mine, val=val)
    times = []
    for i in range(steps + 10):
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        step()
        if i >= 10:
            times.append((time.perf_counter() - start) * 1000)
    if rank == 0:
        print(json.dumps({"median_ms": statistics.median(times)}))
    if world > 1:
        dist.destroy_process_group()


def measure(kind: str, sync: str, steps: int, world: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        init = str(Path(folder) / "init")
        procs = [subprocess.Popen([sys.executable, __file__, "--rank", str(rank), "--world",
                                   str(world), "--init", init, "--kind", kind, "--sync", sync,
                                   "--steps", str(steps)],
                                  stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
                 for rank in range(world)]
        outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    if any(proc.returncode for proc in procs):
        raise RuntimeError(f"a rank failed: {outputs}")
    return float(json.loads(outputs[0].strip().splitlines()[-1])["median_ms"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--sync", choices=["outer", "exact"], default="outer")
    parser.add_argument("--rounds", type=int, default=3, help="alternating 1/2-process rounds")
    parser.add_argument("--kind", default=None)
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--init", default="")
    args = parser.parse_args()
    if args.rank is not None:
        rank_main(args.kind, args.sync, args.steps, args.rank, args.world, args.init)
        return
    print(f"W1 (MLP), global batch 256, sync={args.sync}, torch {torch.__version__}, "
          f"{os.cpu_count()} cores, one thread per process, median of {args.steps} steps, "
          f"median of {args.rounds} alternating rounds\n")
    print("| wrapper | 1 process (ms) | 2 processes (ms) | 2 / 1 |")
    print("| --- | --- | --- | --- |")
    for kind in ("alignment", "reweighter"):
        # Alternating rounds, the median of each: this machine's background load varies.
        rounds = [(measure(kind, args.sync, args.steps, 1),
                   measure(kind, args.sync, args.steps, 2)) for _ in range(args.rounds)]
        one = statistics.median(r[0] for r in rounds)
        two = statistics.median(r[1] for r in rounds)
        print(f"| {kind} | {one:.2f} | {two:.2f} | {two / one:.2f} |")


if __name__ == "__main__":
    main()
