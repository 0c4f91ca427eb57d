"""Both wrappers under DistributedDataParallel: two gloo ranks started by the test (CPU).

``sync="exact"`` must equal one process on the concatenated batches; ``sync="outer"`` must
equal the average of per-shard meta-gradients computed independently; the weight table must be
the same on both ranks, and a checkpoint written at world size 2 must continue at world size 1.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import distributed_worker as worker

from metafair_opt import GradientAlignmentWrapper, SampleReweighter

WORKER = Path(__file__).parent / "distributed_worker.py"


def launch(scenario: str, tmp_path: Path, world: int = 2) -> list[dict]:
    """Run ``scenario`` on ``world`` ranks; each rank's saved record, in rank order."""
    init_file = tmp_path / "init"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), scenario, str(rank), str(world),
                               str(init_file), str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for rank in range(world)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=180)[0])
    finally:
        for proc in procs:
            proc.kill()
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


def concatenated(step: int) -> dict[str, torch.Tensor]:
    shards = [worker.shard_data(step, rank) for rank in range(2)]
    merged = {k: torch.cat([s[k] for s in shards]) for k in shards[0]}
    return merged


def single_process(kind: str, steps: int = worker.STEPS):
    model = worker.make_model()
    wrapper = worker.make_wrapper(kind, model, worker.make_optimizer(model))
    for step in range(steps):
        wrapper.zero_grad()
        worker.run_step(kind, wrapper, concatenated(step))
    return model, wrapper


@pytest.mark.parametrize("kind", ["alignment", "alignment-recompute", "reweighter",
                                  "reweighter-forward", "reweighter-recompute"])
def test_exact_sync_on_two_ranks_equals_one_process_on_the_concatenated_batches(
    kind: str, tmp_path: Path
) -> None:
    """alignment-recompute: recompute_support=True on two ranks (the Hessian-vector products
    summed over ranks) against the one-process default step; reweighter-forward: the
    forward-mode weight gradient on two ranks against the one-process reverse mode;
    reweighter-recompute: the same with recompute_forward=True."""
    scenario = kind.replace("-", "-exact-") if "-" in kind else f"{kind}-exact"
    kind = kind.split("-")[0]
    ranks = launch(scenario, tmp_path)
    model, wrapper = single_process(kind)
    for record in ranks:
        for got, want in zip(record["params"], model.parameters()):
            torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-12)
    assert not torch.equal(ranks[0]["params"][0], worker.make_model()[0].weight)
    if kind == "reweighter":
        assert wrapper.weights.abs().max() > 1e-3  # the table moved
        for record in ranks:
            torch.testing.assert_close(record["weights"], wrapper.weights, rtol=1e-10,
                                       atol=1e-12)
            np.testing.assert_allclose(record["ema"],
                                       wrapper.to_frame()["ema_weighted_loss"].to_numpy(),
                                       rtol=1e-10, equal_nan=True)
        assert torch.equal(ranks[0]["weights"], ranks[1]["weights"])
        # batch_weights: uniform is 1 per row over the global batch (16 rows on two ranks).
        total = ranks[0]["batch_weights"].sum() + ranks[1]["batch_weights"].sum()
        torch.testing.assert_close(total, torch.tensor(16.0, dtype=total.dtype))

        # The checkpoint written once at world size 2 continues at world size 1, exactly.
        state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
        resumed_model = worker.make_model()
        resumed_model.load_state_dict(state["model"])
        resumed = worker.make_wrapper(kind, resumed_model, worker.make_optimizer(resumed_model))
        resumed.load_state_dict(state["wrapper"])
        resumed.zero_grad()
        worker.run_step(kind, resumed, concatenated(worker.STEPS))
        reference_model, reference = single_process(kind, steps=worker.STEPS + 1)
        for got, want in zip(resumed_model.parameters(), reference_model.parameters()):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(resumed.weights, reference.weights, rtol=1e-10, atol=1e-12)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".pt") == [
        "checkpoint.pt", "rank0.pt", "rank1.pt"]


def _independent_shard_steps():
    """sync="outer" by hand for the alignment wrapper: at each step every shard's meta-step
    from the same parameters, computed independently (an lr-0 optimizer leaves the meta-gradient
    in p.grad), the two averaged, one update with the real optimizer."""
    model = worker.make_model()
    optimizer = worker.make_optimizer(model)
    for step in range(worker.STEPS):
        grads = []
        for rank in range(2):
            shard_model = copy.deepcopy(model)
            wrapper = worker.make_wrapper("alignment", shard_model,
                                          torch.optim.SGD(shard_model.parameters(), lr=0.0))
            worker.run_step("alignment", wrapper, worker.shard_data(step, rank))
            grads.append([p.grad.clone() for p in shard_model.parameters()])
        optimizer.zero_grad()
        for p, g0, g1 in zip(model.parameters(), *grads):
            p.grad = (g0 + g1) / 2
        optimizer.step()
    return model


@pytest.mark.parametrize("recompute", [False, True])
def test_outer_sync_equals_the_average_of_independent_shard_meta_gradients(
    recompute: bool, tmp_path: Path
) -> None:
    """recompute: the ranks use recompute_support=True, the shards in this process do not."""
    ranks = launch("alignment-outer" + ("-recompute" if recompute else ""), tmp_path)
    model = _independent_shard_steps()
    for record in ranks:
        for got, want in zip(record["params"], model.parameters()):
            torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_outer_sync_reweighter_keeps_one_table_and_averages_shard_gradients(
    mode: str, tmp_path: Path
) -> None:
    """Row gradients of every rank summed, final gradients averaged: checked one step at a
    time against shards computed independently in this process (reverse mode there)."""
    ranks = launch("reweighter-outer" + ("-forward" if mode == "forward" else ""), tmp_path)
    assert torch.equal(ranks[0]["weights"], ranks[1]["weights"])
    for record in ranks:  # each rank's softmax is over its own 8 rows: uniform is 1 per row
        torch.testing.assert_close(record["batch_weights"].mean(),
                                   torch.tensor(1.0, dtype=record["batch_weights"].dtype))
    np.testing.assert_array_equal(ranks[0]["ema"], ranks[1]["ema"])
    for got0, got1 in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(got0, got1)

    model = worker.make_model()
    optimizer = worker.make_optimizer(model)
    table = torch.zeros(worker.NUM_SAMPLES, dtype=torch.float64)
    for step in range(worker.STEPS):
        shards = [worker.shard_data(step, rank) for rank in range(2)]
        # 1. Each shard's meta-gradient on its own rows at the current table (lr 0 readers).
        row_grads = torch.zeros_like(table)
        for data in shards:
            shard_model = copy.deepcopy(model)
            wrapper = SampleReweighter(  # plain SGD at rate 1: new weights = old - gradient
                shard_model, torch.optim.SGD(shard_model.parameters(), lr=0.0),
                num_samples=worker.NUM_SAMPLES, loss_fn=torch.nn.functional.cross_entropy,
                meta_loss="max_loss_discrepancy", weight_lr=1.0, weight_optimizer="sgd",
                lookahead_lr=0.5)
            wrapper.load_state_dict({**wrapper.state_dict(), "weights": table.clone()})
            worker.run_step("reweighter", wrapper, data)
            rows = torch.unique(data["idx"])
            row_grads[rows] += table[rows] - wrapper.weights[rows].to(table.dtype)
        # 2. The Adam update of the summed row gradients (first moment state per row).
        if step == 0:
            state = {"m": torch.zeros_like(table), "v": torch.zeros_like(table),
                     "t": torch.zeros_like(table)}
        rows = torch.unique(torch.cat([d["idx"] for d in shards]))
        b1, b2, lr = 0.9, 0.999, 0.2
        state["t"][rows] += 1
        state["m"][rows] = b1 * state["m"][rows] + (1 - b1) * row_grads[rows]
        state["v"][rows] = b2 * state["v"][rows] + (1 - b2) * row_grads[rows] ** 2
        m_hat = state["m"][rows] / (1 - b1 ** state["t"][rows])
        v_hat = state["v"][rows] / (1 - b2 ** state["t"][rows])
        table[rows] -= lr * m_hat / (v_hat.sqrt() + 1e-8)
        # 3. Each shard's final gradient with the new weights (local softmax), averaged.
        grads = []
        for data in shards:
            shard_model = copy.deepcopy(model)
            weights = torch.softmax(table[data["idx"]].double(), dim=0)
            losses = torch.nn.functional.cross_entropy(shard_model(data["x"]), data["y"],
                                                       reduction="none")
            grads.append(torch.autograd.grad((weights * losses).sum(),
                                             list(shard_model.parameters())))
        optimizer.zero_grad()
        for p, g0, g1 in zip(model.parameters(), *grads):
            p.grad = (g0 + g1) / 2
        optimizer.step()
    assert table.abs().max() > 1e-3
    torch.testing.assert_close(ranks[0]["weights"], table, rtol=1e-10, atol=1e-12)
    for got, want in zip(ranks[0]["params"], model.parameters()):
        torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["alignment", "reweighter"])
def test_a_nan_on_one_rank_stops_every_rank_and_changes_nothing(kind: str,
                                                                tmp_path: Path) -> None:
    ranks = launch(f"{kind}-outer-nan", tmp_path)
    # Row 0 of rank 1 is NaN: a query row for the alignment wrapper (its group is 0).
    what = ("query loss is nan" if kind == "alignment"
            else "training loss is a non-finite value")
    assert ranks[1]["error"].startswith(f"The {what} on rank 1. Nothing was updated.")
    assert ranks[0]["error"].startswith("A loss on another rank is NaN or inf")
    assert ranks[0]["unchanged"] and ranks[1]["unchanged"]


def test_unequal_batch_sizes_are_refused_on_every_rank(tmp_path: Path) -> None:
    ranks = launch("reweighter-exact-unequal", tmp_path)
    for record in ranks:
        assert record["error"].startswith(
            "SampleReweighter under DDP needs the same batch size on every rank; got [8, 6].")


def test_an_empty_batch_on_one_rank_is_refused_on_every_rank(tmp_path: Path) -> None:
    """Refused through the first collective, as the range check: no rank hangs."""
    ranks = launch("reweighter-outer-empty", tmp_path)
    for record in ranks:
        assert record["error"] == (
            "The training batch is empty; a step needs at least one row (rank(s) [1]); nothing "
            "was updated on any rank.")


def test_an_index_out_of_range_on_one_rank_is_refused_on_every_rank(tmp_path: Path) -> None:
    """The range check rides on the first collective: the other rank raises too, no hang."""
    ranks = launch("reweighter-outer-badindex", tmp_path)
    assert ranks[1]["error"].startswith(
        f"Sample index {worker.NUM_SAMPLES + 3} is outside the weight table's range "
        f"[0, {worker.NUM_SAMPLES}) on rank 1.")
    assert ranks[0]["error"].startswith(
        f"Sample indices on rank(s) [1] are outside the weight table's range "
        f"[0, {worker.NUM_SAMPLES}) (this rank's are inside).")


def test_ddp_model_without_a_process_group_is_refused(tmp_path: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0,
                            world_size=1)
    try:
        model = nn.parallel.DistributedDataParallel(worker.make_model())
    finally:
        dist.destroy_process_group()
    with pytest.raises(RuntimeError, match=r"A DistributedDataParallel model was passed, but "
                                           r"torch\.distributed has no process group"):
        GradientAlignmentWrapper(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                 torch.nn.functional.cross_entropy)


def test_sync_must_be_outer_or_exact() -> None:
    model = worker.make_model()
    with pytest.raises(ValueError, match="sync must be 'outer' or 'exact'; got 'all'"):
        GradientAlignmentWrapper(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                 torch.nn.functional.cross_entropy, sync="all")


def test_torchrun_runs_the_tabular_command_on_two_processes_and_writes_once(
    tmp_path: Path
) -> None:
    out = tmp_path / "german"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "-m", "metafair_opt.cli", "run", "--dataset", "german",
               "--methods", "baseline,faalgrad,forml", "--config", "1", "--epochs", "1",
               "--seeds", "1", "--quiet", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("wrote ") == 1  # rank 0 alone reports
    results = pd.read_csv(out / "results.csv")
    assert {"baseline", "faalgrad c1 I=1", "forml adam w_lr=0.01"} <= set(results["method"])
    assert results["accuracy"].between(0.3, 1.0).all()
    config = json.loads((out / "config.json").read_text())
    assert config["command"].startswith("torchrun --nproc_per_node 2 -m metafair_opt.cli run")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "results.csv", "results.md"]


def test_a_batch_size_that_does_not_divide_among_the_processes_is_refused(
    tmp_path: Path
) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "-m", "metafair_opt.cli", "run", "--dataset", "german",
               "--methods", "baseline", "--epochs", "1", "--seeds", "1", "--batch-size", "65",
               "--quiet", "--out", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert ("The batch size 65 does not divide among 2 processes. Use a multiple of 2 (for "
            "example --batch-size 64 or 66), or another --nproc_per_node.") in result.stderr
    assert not (tmp_path / "out").exists()


def test_torchrun_runs_the_vision_command_and_its_checkpoint_resumes_in_one_process(
    tmp_path: Path
) -> None:
    out, checkpoint = tmp_path / "out", tmp_path / "ckpt"
    options = ["--dataset", "colored-digits", "--method", "forml", "--batch-size", "16",
               "--image-size", "16", "--max-steps-per-epoch", "2", "--device", "cpu",
               "--seeds", "0", "--quiet", "--checkpoint", str(checkpoint)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "-m", "metafair_opt.cli", "vision", *options,
               "--epochs", "1", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("wrote ") == 1
    assert sorted(p.name for p in out.iterdir()) == ["results.csv", "results.md"]
    assert (out / "results.md").read_text().startswith(
        "Command: `torchrun --nproc_per_node 2 -m metafair_opt.cli vision")
    assert [p.name for p in checkpoint.iterdir()] == ["last.pt"]
    state = torch.load(checkpoint / "last.pt", weights_only=False)
    assert state["epoch"] == 1 and not any(k.startswith("module.") for k in state["model"])
    # Two steps of 16 rows shared by two ranks: 32 distinct rows in one table (ranks that did not
    # shard would have drawn the same 16 twice).
    assert int(state["wrapper"]["seen"].sum()) == 2 * 16
    assert int((state["wrapper"]["seen"] > 0).sum()) == 2 * 16

    from metafair_opt.cli import main

    assert main(["vision", *options, "--epochs", "2", "--resume",
                 "--out", str(tmp_path / "resumed")]) == 0
    resumed = torch.load(checkpoint / "last.pt", weights_only=False)
    assert resumed["epoch"] == 2
    assert int(resumed["wrapper"]["seen"].sum()) == 4 * 16


@pytest.mark.parametrize("kind", ["alignment", "reweighter"])
def test_parameters_unused_on_one_rank_keep_the_ranks_identical(kind: str,
                                                                tmp_path: Path) -> None:
    """Rank 0's data uses head a, rank 1's head b: every rank must still reduce the same
    gradient layout (a missing gradient counts as zero), so the parameters stay identical."""
    ranks = launch(f"{kind}-outer-unused", tmp_path)
    for key, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][key]), key
    initial = {k: v.double() for k, v in _two_heads_initial().items()}
    for head in ("a.weight", "b.weight"):  # both heads trained, each by one rank's data
        assert not torch.equal(ranks[0]["params"][head], initial[head])


def _two_heads_initial() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return worker.TwoHeads().state_dict()
