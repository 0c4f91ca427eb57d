"""The benchmark harness: peers agree with our steps, and `metafair-opt bench` prints and writes
the records the benchmarks issue specifies (W1 only, --quick; timings are not asserted)."""

from __future__ import annotations

import json
import math
from unittest.mock import patch

import pytest
import torch

import metafair_opt.benchmark as bench
from metafair_opt.benchmark import (
    AGREEMENT_PAIRS,
    AGREEMENT_TOLERANCE,
    VARIANTS,
    ImplementationsDisagree,
    check_agreement,
    make_workload,
    significant,
    time_interleaved,
    time_pairwise,
)
from metafair_opt.cli import main


def test_every_peer_agrees_with_our_steps_on_the_mlp() -> None:
    report = check_agreement(make_workload("mlp"))
    expected = {f"{ours} vs {other}" for ours, others in AGREEMENT_PAIRS for other in others}
    expected |= {f"reweighter vs {other} (weight update)" for other in (
        "higher_reweighter", "torchfunc_reweighter", "reweighter_compiled",
        "reweighter_recompute")}
    assert set(report) == expected
    assert "alignment_5_inner vs torchfunc_alignment_5_inner" in report
    for key, value in report.items():
        assert value < 1e-5, (key, value)  # float32 rounding; NaN fails too


_REAL_HIGHER_ALIGNMENT = bench._higher_alignment
_REAL_TORCHFUNC_ALIGNMENT = bench._torchfunc_alignment
_REAL_TORCHFUNC_REWEIGHTER = bench._torchfunc_reweighter


def _first_order_peer(model, optimizer, w, rates, steps=1):
    """The hand-written alignment step with its inner gradients taken without a graph: the
    first-order step."""
    step = _REAL_TORCHFUNC_ALIGNMENT(model, optimizer, w, rates, steps)
    grad = torch.autograd.grad

    def without_graph(*args, **kwargs):
        return grad(*args, **{**kwargs, "create_graph": False})

    def first_order() -> None:
        with patch.object(torch.autograd, "grad", without_graph):
            step()
    return first_order


def _peer_without_optimizer_step(model, optimizer, w, rates, steps=1):
    """The ``higher`` alignment step whose optimizer step changes nothing."""
    step = _REAL_HIGHER_ALIGNMENT(model, torch.optim.SGD(model.parameters(), lr=0.0), w,
                                  rates, steps)

    def without() -> None:
        optimizer.zero_grad()
        step()
    return without


def _stale_weights_peer(model, optimizer, w, table, rates):
    """The hand-written reweighting step whose final gradient uses the weights from before
    the update."""
    stale = table.clone()
    step = _REAL_TORCHFUNC_REWEIGHTER(model, optimizer, w, table, rates)
    real_softmax = torch.softmax

    def with_stale_weights() -> None:
        stale.copy_(table)
        calls = []

        def softmax(t, dim):
            calls.append(t)
            # The second call, the final gradient's, gets the table from before the update.
            return real_softmax(stale if len(calls) == 2 else t, dim)

        with patch.object(torch, "softmax", softmax):
            step()
    return with_stale_weights


def _wrong_from_the_second_call(model, optimizer, w, rates, steps=1):
    """The hand-written alignment step whose inner rate doubles from its second call on."""
    first = _REAL_TORCHFUNC_ALIGNMENT(model, optimizer, w, rates, steps)
    later = _REAL_TORCHFUNC_ALIGNMENT(
        model, optimizer, w, bench.Rates(inner=2 * rates.inner, lookahead=rates.lookahead,
                                         weight=rates.weight, model=rates.model), steps)
    calls = []

    def step() -> None:
        calls.append(1)
        (first if len(calls) == 1 else later)()
    return step


@pytest.mark.parametrize("broken, peer, pair", [
    (_first_order_peer, "_torchfunc_alignment", ("alignment", "torchfunc_alignment")),
    (_first_order_peer, "_torchfunc_alignment",
     ("alignment_5_inner", "torchfunc_alignment_5_inner")),
    (_peer_without_optimizer_step, "_higher_alignment", ("alignment", "higher_alignment")),
    (_stale_weights_peer, "_torchfunc_reweighter", ("reweighter", "torchfunc_reweighter")),
    (_wrong_from_the_second_call, "_torchfunc_alignment", ("alignment", "torchfunc_alignment")),
])
def test_the_agreement_check_finds_a_peer_that_computes_another_step(
        monkeypatch, broken, peer, pair) -> None:
    ours, other = pair
    w = make_workload("mlp")
    assert check_agreement(w, pairs=[(ours, [other])])[f"{ours} vs {other}"] < 1e-5
    monkeypatch.setattr(bench, peer, broken)
    gap = check_agreement(w, pairs=[(ours, [other])])[f"{ours} vs {other}"]
    assert gap > 10 * AGREEMENT_TOLERANCE, gap


def test_the_suite_measures_nothing_when_implementations_disagree(monkeypatch) -> None:
    def measured(*args, **kwargs):
        raise AssertionError("measured although the implementations disagree")

    monkeypatch.setattr(bench, "check_agreement", lambda w, device: {
        "alignment vs higher_alignment": 2e-7, "reweighter vs higher_reweighter": 0.25,
        "reweighter vs torchfunc_reweighter (weight update)": math.nan})
    monkeypatch.setattr(bench, "step_peak_memory_mb", measured)
    monkeypatch.setattr(bench, "time_interleaved", measured)
    with pytest.raises(ImplementationsDisagree) as error:
        bench.run_suite(["mlp"])
    assert str(error.value) == (
        "mlp: implementations of the same step disagree (relative difference above 0.001): "
        "reweighter vs higher_reweighter: 0.25; reweighter vs torchfunc_reweighter (weight "
        "update): nan. Nothing was timed: a peer that disagrees is a bug to fix in the "
        "benchmark (or in our step), not a row to publish.")


def test_bench_exits_1_with_the_disagreement(monkeypatch, capsys) -> None:
    monkeypatch.setattr(bench, "check_agreement",
                        lambda w, device: {"alignment vs higher_alignment": 0.5})
    assert main(["bench", "--workload", "mlp", "--quick"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines()[-1].startswith(
        "metafair-opt: error: mlp: implementations of the same step disagree (relative "
        "difference above 0.001): alignment vs higher_alignment: 0.5.")


def test_the_suite_times_nothing_when_memory_cannot_be_measured(monkeypatch) -> None:
    def timed(*args, **kwargs):
        raise AssertionError("timed before the memory was measured")

    def failing(workload, variant, *args):
        raise RuntimeError(f"no memory figure for {variant}")

    monkeypatch.setattr(bench, "check_agreement", lambda w, device: {})
    monkeypatch.setattr(bench, "time_interleaved", timed)
    monkeypatch.setattr(bench, "step_peak_memory_mb", failing)
    with pytest.raises(RuntimeError, match="no memory figure for plain"):
        bench.run_suite(["mlp"])


def test_a_failed_memory_process_shows_its_error() -> None:
    with pytest.raises(RuntimeError) as error:
        bench.step_peak_memory_mb("mlp", "no_such_variant")
    message = str(error.value)
    assert message.startswith("Measuring the memory of mlp's 'no_such_variant' step in a "
                              "fresh process failed (exit status 1); its error output ends "
                              "with:\n")
    assert message.rstrip().endswith(
        f"ValueError: Unknown variant 'no_such_variant'; choose from {list(VARIANTS)}.")


def test_every_workload_is_checked_before_any_is_measured(monkeypatch) -> None:
    def measured(*args, **kwargs):
        raise AssertionError("measured although a workload's implementations disagree")

    checked = []

    def check(w, device):
        checked.append(w.name)
        return {"alignment vs higher_alignment": 0.5 if w.name == "resnet18" else 0.0}

    monkeypatch.setattr(bench, "check_agreement", check)
    monkeypatch.setattr(bench, "step_peak_memory_mb", measured)
    monkeypatch.setattr(bench, "time_interleaved", measured)
    with pytest.raises(ImplementationsDisagree, match=r"^resnet18: implementations"):
        bench.run_suite(["mlp", "resnet18"])
    assert checked == ["mlp", "resnet18"]


@pytest.mark.parametrize("threads", ["0", "-1", "two"])
def test_bench_refuses_a_thread_count_that_is_not_positive(capsys, threads) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--threads", threads])
    assert exit_.value.code == 2
    expected = (f"'{threads}'" if threads == "two" else threads)
    assert capsys.readouterr().err.strip().endswith(
        f"argument --threads: expected a positive integer, got {expected}")


def test_a_file_as_the_output_folder_fails_before_any_work(monkeypatch, capsys,
                                                           tmp_path) -> None:
    def measured(*args, **kwargs):
        raise AssertionError("ran although --out cannot be written")

    monkeypatch.setattr(bench, "run_suite", measured)
    taken = tmp_path / "results"
    taken.write_text("not a folder")
    assert main(["bench", "--out", str(taken)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"metafair-opt: error: --out {taken} is a file; pass a folder to write the results "
        "into.")
    assert main(["run", "--out", str(taken / "inner")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"metafair-opt: error: Cannot create the --out folder {taken / 'inner'}: {taken} is a "
        "file.")
    assert main(["run", "--out", str(tmp_path / "new" / "folder"), "--dataset", "mnist"]) == 2
    assert not (tmp_path / "new").exists()  # a failed run creates nothing


def test_an_output_folder_without_write_permission_fails_before_any_work(
        monkeypatch, capsys, tmp_path) -> None:
    import metafair_opt.cli as cli

    monkeypatch.setattr(bench, "run_suite", lambda *args, **kwargs: pytest.fail("ran"))
    monkeypatch.setattr(cli.os, "access", lambda path, mode: False)  # tests run as root
    assert main(["bench", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"metafair-opt: error: Cannot write into the --out folder {tmp_path}: permission "
        "denied.")
    assert main(["bench", "--out", str(tmp_path / "a" / "b")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"metafair-opt: error: Cannot create the --out folder {tmp_path / 'a' / 'b'}: no "
        f"permission to write in {tmp_path}.")
    monkeypatch.setenv("RANK", "1")  # under torchrun only rank 0 writes, and checks
    monkeypatch.setattr(cli, "_bench", lambda args, command: 0)
    assert main(["bench", "--out", str(tmp_path)]) == 0


def test_bench_prints_json_records_and_writes_the_results(capsys, tmp_path) -> None:
    assert main(["bench", "--workload", "mlp", "--quick", "--format", "json", "--pairwise",
                 "--out", str(tmp_path)]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["variant"] for r in records] == list(VARIANTS)
    for record in records:
        assert set(record) == {"workload", "variant", "median_ms", "ratio_to_plain",
                               "ratio_to_plain_pairwise", "peak_live_mb", "peak_rss_mb"}
        assert record["workload"] == "mlp" and record["median_ms"] > 0
        assert record["peak_live_mb"] > 0 and record["peak_rss_mb"] >= 0
        assert record["ratio_to_plain_pairwise"] > 0
    assert records[0]["ratio_to_plain"] == records[0]["ratio_to_plain_pairwise"] == 1
    markdown = (tmp_path / "results.md").read_text()
    assert markdown.startswith("Command: `metafair-opt bench --workload mlp --quick")
    assert "ratio_to_plain_pairwise" in markdown
    assert "CPU cores" in markdown and "torch " in markdown
    assert "reweighter vs torchfunc_reweighter (weight update)" in markdown
    assert ("Agreement before timing (`metafair_opt.benchmark.check_agreement`: two steps "
            "each, both from the same start") in markdown
    assert (tmp_path / "results.csv").read_text().splitlines()[0] == (
        "workload,variant,median_ms,ratio_to_plain,ratio_to_plain_pairwise,peak_live_mb,"
        "peak_rss_mb")


def test_interleaving_runs_every_step_once_per_round_in_shuffled_orders() -> None:
    calls: list[str] = []
    steps = {name: (lambda name=name: calls.append(name)) for name in "abcde"}
    medians = time_interleaved(steps, repeats=6, warmup=0)
    assert set(medians) == set("abcde")
    rounds = [calls[i:i + 5] for i in range(0, 30, 5)]
    assert all(sorted(r) == list("abcde") for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1  # not one fixed order
    calls.clear()
    time_interleaved(steps, repeats=6, warmup=0)
    assert [calls[i:i + 5] for i in range(0, 30, 5)] == rounds  # seeded: reproducible


def test_pairwise_timing_runs_each_variant_beside_the_reference_alone() -> None:
    calls: list[str] = []
    clock = [0.0]

    def step(name: str, cost: float):
        def run() -> None:
            calls.append(name)
            clock[0] += cost
        return run

    steps = {"plain": step("plain", 1.0), "a": step("a", 2.0), "b": step("b", 3.0)}
    with patch("metafair_opt.benchmark.time.perf_counter", lambda: clock[0]):
        ratios = time_pairwise(steps, repeats=4)
    assert ratios == {"plain": 1.0, "a": 2.0, "b": 3.0}
    # Three warm-up calls each, then rounds of the reference and one other variant only.
    first, second = calls[:14], calls[14:]
    assert sorted(first[6:]) == ["a"] * 4 + ["plain"] * 4
    assert sorted(second[6:]) == ["b"] * 4 + ["plain"] * 4


def test_the_suite_adds_the_pairwise_ratio_only_when_asked(monkeypatch) -> None:
    def step() -> None:
        torch.ones(64).sum()

    monkeypatch.setattr(bench, "check_agreement", lambda w, device: {})
    monkeypatch.setattr(bench, "make_step", lambda variant, w, device: (step, None))
    monkeypatch.setattr(bench, "step_peak_memory_mb",
                        lambda *args: {"peak_rss_mb": 1.0, "peak_live_mb": 2.0})
    for pairwise in (False, True):
        records = bench.run_suite(["mlp"], quick=True, pairwise=pairwise)
        assert [r["variant"] for r in records] == list(VARIANTS)
        assert all(("ratio_to_plain_pairwise" in r) == pairwise for r in records)


def test_memory_figures_keep_four_significant_figures() -> None:
    # W1's peaks are fractions of a megabyte and W2's thousands: one decimal would make W1's
    # variants look alike (0.2 MB each) and a fixed precision would clutter W2's.
    assert significant(0.23456) == 0.2346
    assert significant(0.0123456) == 0.01235
    assert significant(1861.44) == 1861.0
    assert significant(273.94) == 273.9
    assert significant(None) is None
