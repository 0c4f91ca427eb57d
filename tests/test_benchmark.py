"""The benchmark harness: peers agree with our steps, and `metafair-opt bench` prints and writes
the records the benchmarks issue specifies (W1 only, --quick; real timings are not asserted, the
arithmetic on them is, on a fake clock)."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace
from unittest.mock import patch

import pytest
import torch

import metafair_opt.benchmark as bench
from metafair_opt.benchmark import (
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

#: The variants and JSON names the benchmarks issue specifies, written out here rather than
#: read from the code under test.
ISSUE_VARIANTS = ["plain", "alignment", "alignment_first_order", "alignment_5_inner",
                  "reweighter", "reweighter_every_5", "higher_alignment", "higher_reweighter",
                  "torchfunc_alignment", "torchfunc_reweighter"]


def test_every_peer_agrees_with_our_steps_on_the_mlp() -> None:
    report = check_agreement(make_workload("mlp"))
    compared = {
        "alignment": ["higher_alignment", "torchfunc_alignment", "alignment_compiled",
                      "alignment_recompute"],
        "alignment_first_order": ["higher_alignment_first_order",
                                  "torchfunc_alignment_first_order",
                                  "alignment_first_order_compiled"],
        "alignment_5_inner": ["higher_alignment_5_inner", "torchfunc_alignment_5_inner"],
        "reweighter": ["higher_reweighter", "torchfunc_reweighter", "reweighter_compiled",
                       "reweighter_recompute"],
        "reweighter_every_5": ["higher_reweighter_every_5", "torchfunc_reweighter_every_5"],
    }
    expected = {f"{ours} vs {other}" for ours, others in compared.items() for other in others}
    expected |= {f"{ours} vs {other} (weight update)" for ours in ("reweighter",
                 "reweighter_every_5") for other in compared[ours]}
    assert set(report) == expected
    for key, value in report.items():
        assert value < 1e-5, (key, value)  # float32 rounding; NaN fails too


def test_the_hand_written_peers_agree_with_our_steps_on_the_resnet() -> None:
    """W2 with BatchNorm in train mode: the running statistics each implementation updates
    (ours only in the committed forward) and the buffers it passes to functional_call must not
    change the gradients. The alignment and reweighting steps against their hand-written
    peers (49 s on two cores; bench checks every pair before it times W2)."""
    report = check_agreement(make_workload("resnet18"), pairs=[
        ("alignment", ["torchfunc_alignment"]), ("reweighter", ["torchfunc_reweighter"])])
    assert set(report) == {"alignment vs torchfunc_alignment",
                           "reweighter vs torchfunc_reweighter",
                           "reweighter vs torchfunc_reweighter (weight update)"}
    for key, value in report.items():
        assert value < 1e-4, (key, value)  # measured 8.0e-6, 1.7e-6 and 4.8e-7; NaN fails


_REAL_HIGHER_ALIGNMENT = bench._higher_alignment
_REAL_TORCHFUNC_ALIGNMENT = bench._torchfunc_alignment
_REAL_TORCHFUNC_REWEIGHTER = bench._torchfunc_reweighter
_REAL_EVERY = bench._every


def _first_order_peer(model, optimizer, w, rates, steps=1, first_order=False):
    """The hand-written first-order step, asked for or not."""
    return _REAL_TORCHFUNC_ALIGNMENT(model, optimizer, w, rates, steps, first_order=True)


def _second_order_peer(model, optimizer, w, rates, steps=1, first_order=False):
    """The hand-written second-order step, asked for or not."""
    return _REAL_TORCHFUNC_ALIGNMENT(model, optimizer, w, rates, steps, first_order=False)


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


def _uniform_between_updates(meta_every, meta_step, model, optimizer, w, table):
    """The peers' ``meta_every`` whose plain steps between weight updates weight every row
    alike (the softmax of a table of zeros)."""
    return _REAL_EVERY(meta_every, meta_step, model, optimizer, w, torch.zeros_like(table))


def _updating_on_every_step(meta_every, meta_step, model, optimizer, w, table):
    """The peers' ``meta_every`` that updates the weights on every step."""
    return meta_step


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


def _non_finite_from_the_second_call(model, optimizer, w, rates, steps=1):
    """The hand-written alignment step whose gradients turn NaN from its second call on."""
    real = _REAL_TORCHFUNC_ALIGNMENT(model, optimizer, w, rates, steps)
    calls = []

    def step() -> None:
        calls.append(1)
        real()
        if len(calls) > 1:
            next(model.parameters()).grad[0] = math.nan
    return step


@pytest.mark.parametrize("broken, peer, pair", [
    (_first_order_peer, "_torchfunc_alignment", ("alignment", "torchfunc_alignment")),
    (_first_order_peer, "_torchfunc_alignment",
     ("alignment_5_inner", "torchfunc_alignment_5_inner")),
    (_second_order_peer, "_torchfunc_alignment",
     ("alignment_first_order", "torchfunc_alignment_first_order")),
    (_peer_without_optimizer_step, "_higher_alignment", ("alignment", "higher_alignment")),
    (_stale_weights_peer, "_torchfunc_reweighter", ("reweighter", "torchfunc_reweighter")),
    (_wrong_from_the_second_call, "_torchfunc_alignment", ("alignment", "torchfunc_alignment")),
    (_uniform_between_updates, "_every",
     ("reweighter_every_5", "torchfunc_reweighter_every_5")),
    (_updating_on_every_step, "_every", ("reweighter_every_5", "higher_reweighter_every_5")),
])
def test_the_agreement_check_finds_a_peer_that_computes_another_step(
        monkeypatch, broken, peer, pair) -> None:
    ours, other = pair
    w = make_workload("mlp")
    assert check_agreement(w, pairs=[(ours, [other])])[f"{ours} vs {other}"] < 1e-5
    monkeypatch.setattr(bench, peer, broken)
    gap = check_agreement(w, pairs=[(ours, [other])])[f"{ours} vs {other}"]
    assert gap > 10 * AGREEMENT_TOLERANCE, gap


def test_a_gradient_that_turns_non_finite_on_the_second_step_fails_the_check(
        monkeypatch) -> None:
    # The NaN comes from the second of the check's two steps: a maximum that skipped NaN
    # (Python's max with the first step's finite gap first) would pass it.
    monkeypatch.setattr(bench, "_torchfunc_alignment", _non_finite_from_the_second_call)
    report = check_agreement(make_workload("mlp"),
                             pairs=[("alignment", ["torchfunc_alignment"])])
    assert math.isnan(report["alignment vs torchfunc_alignment"])
    monkeypatch.setattr(bench, "check_agreement", lambda w, device, pairs: report)
    with pytest.raises(ImplementationsDisagree, match="alignment vs torchfunc_alignment: nan"):
        bench.run_suite(["mlp"], quick=True, variants=["alignment"])


def test_weight_tables_are_compared_only_where_one_moved(monkeypatch) -> None:
    w = make_workload("mlp")
    pair = [("reweighter_every_5", ["torchfunc_reweighter_every_5"])]
    key = "reweighter_every_5 vs torchfunc_reweighter_every_5 (weight update)"
    # The peer updates the weights on its second step too, where ours does not: ours stayed
    # put, so the difference is infinite.
    monkeypatch.setattr(bench, "_every", _updating_on_every_step)
    assert check_agreement(w, pairs=pair)[key] == math.inf
    # Neither table moved in either step: nothing was compared, which reads NaN.
    unmoved = ([torch.ones(2)], [torch.ones(2)], torch.zeros(3))
    with (patch.object(bench, "_weight_rate", lambda *args: 1.0),
          patch.object(bench, "_one_step", lambda built, device: unmoved)):
        report = check_agreement(w, pairs=pair)
    assert report["reweighter_every_5 vs torchfunc_reweighter_every_5"] == 0
    assert math.isnan(report[key])


def test_the_weight_rate_is_scaled_only_for_reweighter_pairs(monkeypatch) -> None:
    def unwanted(*args):
        raise AssertionError("the weight rate was scaled without a reweighter pair")

    monkeypatch.setattr(bench, "_weight_rate", unwanted)
    report = check_agreement(make_workload("mlp"),
                             pairs=[("alignment_first_order", ["alignment_first_order_compiled"])])
    assert set(report) == {"alignment_first_order vs alignment_first_order_compiled"}


def test_a_vanishing_or_non_finite_weight_update_stops_the_check() -> None:
    """Two validation groups with identical examples: the mean loss discrepancy is 0 and
    its gradient too, so no weight update could be compared."""
    w = make_workload("mlp")
    same = torch.cat([w.x_val[:32], w.x_val[:32]]), torch.cat([w.y_val[:32], w.y_val[:32]])
    flat = replace(w, x_val=same[0], y_val=same[1], g_val=torch.arange(64) // 32)
    with pytest.raises(RuntimeError, match=r"^mlp: our reweighter's weight update is 0 at "
                                           r"weight rate 1, so the agreement check would "
                                           r"compare no weight update\. The meta-gradient "
                                           r"vanished"):
        check_agreement(flat, pairs=[("reweighter", ["torchfunc_reweighter"])])
    nan_update = ([], [], torch.tensor([math.nan]))
    with (patch.object(bench, "_one_step", lambda built, device: nan_update),
          pytest.raises(RuntimeError, match=r"^mlp: our reweighter's weight update at weight "
                                            r"rate 1 is not finite \(nan\)")):
        check_agreement(w, pairs=[("reweighter", ["torchfunc_reweighter"])])


def test_bench_without_higher_says_how_to_install_it(monkeypatch, capsys) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "higher" else find_spec(name, *a))
    assert main(["bench", "--workload", "mlp", "--quick"]) == 2
    assert capsys.readouterr().err.strip() == (
        "metafair-opt: error: bench times the steps written with the higher library as peers, "
        "and higher is not installed: pip install -e \".[dev]\" (or pip install "
        "higher==0.2.1).")


def test_a_failure_inside_the_suite_is_not_reported_as_a_bad_argument(monkeypatch) -> None:
    def failing(*args, **kwargs):
        raise ValueError("something inside the suite")

    monkeypatch.setattr(bench, "run_suite", failing)
    with pytest.raises(RuntimeError, match=r"^The benchmark suite failed: ValueError\('something "
                                           r"inside the suite'\)$"):
        main(["bench", "--workload", "mlp", "--quick"])


def test_the_suite_measures_nothing_when_implementations_disagree(monkeypatch) -> None:
    def measured(*args, **kwargs):
        raise AssertionError("measured although the implementations disagree")

    monkeypatch.setattr(bench, "check_agreement", lambda w, device, pairs: {
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
                        lambda w, device, pairs: {"alignment vs higher_alignment": 0.5})
    assert main(["bench", "--workload", "mlp", "--quick"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines()[-1].startswith(
        "metafair-opt: error: mlp: implementations of the same step disagree (relative "
        "difference above 0.001): alignment vs higher_alignment: 0.5.")


def test_memory_is_the_median_of_fresh_processes_run_in_rounds(monkeypatch) -> None:
    figures = {"plain": iter([400.0, 350.0, 446.0]), "alignment": iter([600.0, 700.0, 650.0])}
    live = {"plain": iter([9.0, 7.0, 3.0]), "alignment": iter([12.0, 10.0, 8.0])}  # median 2nd
    calls, heard = [], []

    def measured(workload, variant, threads, device):
        calls.append((workload, variant, threads, device))
        return {"peak_rss_mb": next(figures[variant]), "peak_live_mb": next(live[variant])}

    monkeypatch.setattr(bench, "step_peak_memory_mb", measured)
    memory = bench.measure_memory("resnet18", ["plain", "alignment"], 2, "cpu", repeats=3,
                                  processes=1, progress=heard.append)
    assert memory == {
        "plain": {"peak_live_mb": 7.0, "peak_rss_mb": 400.0, "peak_rss_mb_min": 350.0,
                  "peak_rss_mb_max": 446.0},
        "alignment": {"peak_live_mb": 10.0, "peak_rss_mb": 650.0, "peak_rss_mb_min": 600.0,
                      "peak_rss_mb_max": 700.0},
    }
    assert calls == [("resnet18", variant, 2, "cpu") for _ in range(3)
                     for variant in ("plain", "alignment")]  # every variant once a round
    assert heard[:2] == ["resnet18 plain: {'peak_rss_mb': 400.0, 'peak_live_mb': 9.0}",
                         "resnet18 alignment: {'peak_rss_mb': 600.0, 'peak_live_mb': 12.0}"]
    assert len(heard) == 6


def test_memory_without_an_rss_figure_reports_none_for_it(monkeypatch) -> None:
    live = iter([9.0, 5.0, 7.0])  # the median neither first nor last
    monkeypatch.setattr(bench, "step_peak_memory_mb", lambda *args: {
        "peak_rss_mb": None, "peak_live_mb": next(live)})  # as on CUDA
    assert bench.measure_memory("mlp", ["plain"], processes=1) == {"plain": {
        "peak_live_mb": 7.0, "peak_rss_mb": None, "peak_rss_mb_min": None,
        "peak_rss_mb_max": None}}


def test_memory_needs_at_least_one_process() -> None:
    with pytest.raises(ValueError, match=r"^repeats must be at least 1; got 0\.$"):
        bench.measure_memory("mlp", ["plain"], repeats=0)


def test_the_full_suite_reports_the_median_of_its_memory_processes(monkeypatch) -> None:
    # Two processes at a time: the order of a variant's figures may change, not the median.
    peaks = {"plain": [300.0, 500.0, 400.0], "alignment": [610.0, 590.0, 900.0]}

    def measured(workload, variant, threads, device):
        return {"peak_rss_mb": peaks[variant].pop(), "peak_live_mb": 1.0}

    monkeypatch.setattr(bench, "check_agreement", lambda w, device, pairs: {})
    monkeypatch.setattr(bench, "step_peak_memory_mb", measured)
    monkeypatch.setattr(bench, "make_step", lambda variant, w, device: (lambda: None, None))
    records = bench.run_suite(["mlp"], variants=["alignment"])
    memory = {r["variant"]: (r["peak_rss_mb"], r["peak_rss_mb_min"], r["peak_rss_mb_max"])
              for r in records}
    assert bench.memory_repeats(quick=False) == 3 and bench.memory_repeats(quick=True) == 1
    assert memory == {"plain": (400.0, 300.0, 500.0), "alignment": (610.0, 590.0, 900.0)}
    assert peaks == {"plain": [], "alignment": []}  # three processes each


def test_the_suite_times_nothing_when_memory_cannot_be_measured(monkeypatch) -> None:
    def timed(*args, **kwargs):
        raise AssertionError("timed before the memory was measured")

    def failing(workload, variant, *args):
        raise RuntimeError(f"no memory figure for {variant}")

    monkeypatch.setattr(bench, "check_agreement", lambda w, device, pairs: {})
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

    def check(w, device, pairs):
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


def test_the_issue_s_variants_are_all_benchmarked_in_its_order() -> None:
    assert [v for v in VARIANTS if v in ISSUE_VARIANTS] == ISSUE_VARIANTS


def test_bench_prints_json_records_and_writes_the_results(capsys, tmp_path) -> None:
    """The real suite end to end on a few variants of W1 (an eager and a compiled step of
    ours, meta_every=5 and a peer of it), with their agreement checks and memory processes.
    Every step runs in the agreement check (test_every_peer_agrees_with_our_steps_on_the_mlp)
    and each of ours 200 times in tests/test_no_leaks.py; the figures' arithmetic is checked
    on a fake clock (test_the_suite_reports_the_timed_medians_their_ratios_and_the_checks)."""
    chosen = ["alignment", "reweighter_every_5", "alignment_first_order_compiled",
              "torchfunc_reweighter_every_5"]
    assert main(["bench", "--workload", "mlp", "--quick", "--format", "json", "--pairwise",
                 "--variants", ",".join(chosen), "--out", str(tmp_path)]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["variant"] for r in records] == [v for v in VARIANTS
                                               if v in chosen or v == "plain"]
    for record in records:
        assert set(record) == {"workload", "variant", "median_ms", "ratio_to_plain",
                               "ratio_to_plain_pairwise", "peak_live_mb", "peak_rss_mb",
                               "peak_rss_mb_min", "peak_rss_mb_max"}
        assert record["workload"] == "mlp" and record["median_ms"] > 0
        assert record["peak_live_mb"] > 0 and record["peak_rss_mb"] >= 0
        # --quick: one process per variant, whose peak is its own range
        assert record["peak_rss_mb_min"] == record["peak_rss_mb"] == record["peak_rss_mb_max"]
        assert record["ratio_to_plain_pairwise"] > 0
    assert records[0]["ratio_to_plain"] == records[0]["ratio_to_plain_pairwise"] == 1
    markdown = (tmp_path / "results.md").read_text()
    assert markdown.startswith("Command: `metafair-opt bench --workload mlp --quick")
    assert "ratio_to_plain_pairwise" in markdown
    assert ("memory in MB of 2**20 bytes (MiB), each variant's median of 1 fresh process(es) "
            "(the RSS peaks' range in peak_rss_mb_min and peak_rss_mb_max)") in markdown
    assert "CPU cores" in markdown and "torch " in markdown
    assert "reweighter_every_5 vs higher_reweighter_every_5 (weight update)" in markdown
    assert ("Agreement before timing (`metafair_opt.benchmark.check_agreement`: two steps "
            "each, both from the same start") in markdown
    assert (tmp_path / "results.csv").read_text().splitlines()[0] == (
        "workload,variant,median_ms,ratio_to_plain,ratio_to_plain_pairwise,peak_live_mb,"
        "peak_rss_mb,peak_rss_mb_min,peak_rss_mb_max")


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


def test_interleaved_timing_reports_each_step_s_median_round() -> None:
    clock = [0.0]
    costs = iter([10.0, 1.0, 3.0, 8.0, 2.0])  # median 3; mean 4.8, first 10, last 2

    def varying() -> None:
        clock[0] += next(costs)

    def steady() -> None:
        clock[0] += 2.0

    with patch("metafair_opt.benchmark.time.perf_counter", lambda: clock[0]):
        medians = time_interleaved({"varying": varying, "steady": steady}, repeats=5,
                                   warmup=0)
    assert medians == {"varying": 3000.0, "steady": 2000.0}


def test_a_cycle_is_timed_call_by_call_among_the_others_and_averaged() -> None:
    """reweighter_every_5's five steps (one weight update, four plain ones) each take their
    own place in a round's shuffled order, not five in a row, and its figure is the cycle's
    mean step."""
    calls: list[str] = []
    clock = [0.0]
    costs = iter([5.0, 1.0, 1.0, 1.0, 1.0] * 100)  # the cycle's steps, in the order they run

    def cyclic() -> None:
        calls.append("c")
        clock[0] += next(costs)

    def other() -> None:
        calls.append("o")
        clock[0] += 2.0

    with patch("metafair_opt.benchmark.time.perf_counter", lambda: clock[0]):
        medians = time_interleaved({"o": other, "c": cyclic}, repeats=20, warmup=0,
                                   cycles={"c": 5})
    assert medians == {"o": 2000.0, "c": 1800.0}  # ms: (5 + 4 * 1) / 5 seconds
    rounds = [calls[i:i + 6] for i in range(0, 120, 6)]
    assert all(sorted(r) == ["c"] * 5 + ["o"] for r in rounds)
    assert any(r.index("o") not in (0, 5) for r in rounds)  # "o" lands inside the cycle


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

    monkeypatch.setattr(bench, "check_agreement", lambda w, device, pairs: {})
    monkeypatch.setattr(bench, "make_step", lambda variant, w, device: (step, None))
    monkeypatch.setattr(bench, "step_peak_memory_mb",
                        lambda *args: {"peak_rss_mb": 1.0, "peak_live_mb": 2.0})
    for pairwise in (False, True):
        records = bench.run_suite(["mlp"], quick=True, pairwise=pairwise)
        assert [r["variant"] for r in records] == list(VARIANTS)
        assert all(("ratio_to_plain_pairwise" in r) == pairwise for r in records)


def _fake_steps(costs: dict[str, list[float]], clock: list[float]):
    """A ``make_step`` whose steps advance ``clock`` by their variant's costs in turn."""
    def make_step(variant, w, device):
        cost = itertools.cycle(costs[variant])

        def step() -> None:
            clock[0] += next(cost)
        return step, None
    return make_step


@pytest.mark.parametrize("workload, quick, repeats", [
    ("mlp", True, 30), ("mlp", False, 200), ("resnet18", True, 10), ("resnet18", False, 50)])
def test_the_suite_reports_the_timed_medians_their_ratios_and_the_checks(
        monkeypatch, workload, quick, repeats) -> None:
    """Each record's median is its variant's (for reweighter_every_5 the mean step of its
    five-step cycle: one weight update at 9 s, four plain steps at 1 s), its ratios are to
    the plain step's, timed with every variant and beside the plain step alone, and the
    memory and the checks are the ones measured."""
    clock = [0.0]
    costs = {"plain": [2.0], "alignment": [5.0], "reweighter_every_5": [9.0, 1.0, 1.0, 1.0, 1.0]}
    timed = []
    real_time_interleaved = bench.time_interleaved

    def time_interleaved(steps, repeats, **kwargs):
        timed.append((sorted(steps), repeats, kwargs.get("cycles")))
        return real_time_interleaved(steps, repeats, **kwargs)

    live = {"plain": 1.5, "alignment": 2.25, "reweighter_every_5": 3.125}
    monkeypatch.setattr(bench, "check_agreement", lambda w, device, pairs: {
        "alignment vs higher_alignment": 2.5e-6})
    monkeypatch.setattr(bench, "make_step", _fake_steps(costs, clock))
    monkeypatch.setattr(bench, "time_interleaved", time_interleaved)
    monkeypatch.setattr(bench, "step_peak_memory_mb", lambda workload, variant, *args: {
        "peak_rss_mb": 100 * live[variant], "peak_live_mb": live[variant]})
    with patch("metafair_opt.benchmark.time.perf_counter", lambda: clock[0]):
        records = bench.run_suite([workload], quick=quick, pairwise=True,
                                  variants=["reweighter_every_5", "alignment"])
    ms = {"plain": 2000.0, "alignment": 5000.0, "reweighter_every_5": 2600.0}
    assert records == [
        {"workload": workload, "variant": variant, "median_ms": ms[variant],
         "ratio_to_plain": ms[variant] / 2000.0, "ratio_to_plain_pairwise": ms[variant] / 2000.0,
         "peak_live_mb": live[variant], "peak_rss_mb": 100 * live[variant],
         "peak_rss_mb_min": 100 * live[variant], "peak_rss_mb_max": 100 * live[variant]}
        for variant in ("plain", "alignment", "reweighter_every_5")  # VARIANTS' order
    ] + [{"workload": workload, "check": "alignment vs higher_alignment",
          "relative_difference": 2.5e-6}]
    assert timed == [
        (["alignment", "plain", "reweighter_every_5"], repeats, bench.CYCLE_STEPS),
        (["alignment", "plain"], repeats, bench.CYCLE_STEPS),
        (["plain", "reweighter_every_5"], repeats, bench.CYCLE_STEPS),
    ]


def _bench_records(workload: str = "mlp") -> list[dict]:
    return [
        {"workload": workload, "variant": "plain", "median_ms": 0.5, "ratio_to_plain": 1.0,
         "peak_live_mb": 0.25, "peak_rss_mb": 1.5, "peak_rss_mb_min": 1.0,
         "peak_rss_mb_max": 2.0},
        {"workload": workload, "variant": "alignment", "median_ms": 1.25,
         "ratio_to_plain": 2.5, "peak_live_mb": 0.5, "peak_rss_mb": 3.0,
         "peak_rss_mb_min": 2.5, "peak_rss_mb_max": 3.5},
        {"workload": workload, "check": "alignment vs higher_alignment",
         "relative_difference": 3.25e-06},
    ]


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_bench_prints_the_suite_s_records_in_the_format_asked_for(monkeypatch, capsys,
                                                                   fmt) -> None:
    asked = []

    def run_suite(workloads, device, **kwargs):
        asked.append((tuple(workloads), str(device), kwargs["quick"], kwargs["pairwise"],
                      kwargs["variants"], torch.get_num_threads()))
        return _bench_records()

    monkeypatch.setattr(bench, "run_suite", run_suite)
    threads = torch.get_num_threads()
    assert main(["bench", "--workload", "all", "--format", fmt, "--threads", "1",
                 "--variants", "alignment", "--pairwise"]) == 0
    assert torch.get_num_threads() == threads  # put back
    assert asked == [(("mlp", "resnet18"), "cpu", False, True, ["alignment"], 1)]
    out, err = capsys.readouterr()
    expected = {
        "table": ("| workload | variant | median_ms | ratio_to_plain | peak_live_mb | peak_rss_mb "
                  "| peak_rss_mb_min | peak_rss_mb_max |\n"
                  "| --- | --- | --- | --- | --- | --- | --- | --- |\n"
                  "| mlp | plain | 0.5 | 1 | 0.25 | 1.5 | 1 | 2 |\n"
                  "| mlp | alignment | 1.25 | 2.5 | 0.5 | 3 | 2.5 | 3.5 |\n"),
        "csv": ("workload,variant,median_ms,ratio_to_plain,peak_live_mb,peak_rss_mb,"
                "peak_rss_mb_min,peak_rss_mb_max\n"
                "mlp,plain,0.5,1.0,0.25,1.5,1.0,2.0\n"
                "mlp,alignment,1.25,2.5,0.5,3.0,2.5,3.5\n"),
        "json": json.dumps(_bench_records()[:2], indent=2) + "\n",
    }[fmt]
    assert out == expected
    assert err.splitlines() == ["mlp: alignment vs higher_alignment: relative difference 3.25e-06"]


def test_make_workload_builds_the_issue_s_batches_and_splits() -> None:
    """W1: 256 rows of 100 features split 80/176, binary targets; W2: 64 images of 3x32x32
    split 24/40, ten classes; both with a validation batch of 64 in two groups of 32."""
    for name, shape, n_support, classes in (("mlp", (256, 100), 80, {0.0, 1.0}),
                                            ("resnet18", (64, 3, 32, 32), 24, set(range(10)))):
        w = make_workload(name)
        assert tuple(w.x.shape) == shape and tuple(w.x_val.shape) == (64, *shape[1:])
        x_s, y_s, x_q, y_q = w.sets()
        assert (len(x_s), len(x_q)) == (n_support, shape[0] - n_support)
        assert len(y_s) == n_support and len(y_q) == shape[0] - n_support
        assert set(w.y.tolist()) <= classes and set(w.y_val.tolist()) <= classes
        assert torch.bincount(w.g_val).tolist() == [32, 32]
        out = w.model(torch.device("cpu"))(w.x[:2])
        assert w.loss(out, w.y[:2], reduction="none").shape == (2,)
    with pytest.raises(ValueError, match=r"^Unknown workload 'cnn'; choose from \['mlp', "
                                         r"'resnet18'\]\.$"):
        make_workload("cnn")


def test_the_option_steps_of_the_benchmarks_pass_their_options_on() -> None:
    """make_alignment_step and make_reweighter_step (benchmarks/ only) build their step with
    the options given: five inner steps train as the alignment_5_inner variant does, not as
    one; an option the reweighter refuses reaches it."""
    w = make_workload("mlp")

    def trained(step, model) -> list[torch.Tensor]:
        step()
        return [p.detach().clone() for p in model.parameters()]

    def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
        return all(torch.allclose(x, y, rtol=1e-5, atol=1e-7) for x, y in zip(a, b))

    five = trained(*bench.make_alignment_step(w, inner_steps=5))
    assert same(five, trained(*bench.make_step("alignment_5_inner", w)))
    assert not same(five, trained(*bench.make_step("alignment", w)))
    assert same(trained(*bench.make_reweighter_step(w, weight_grad_mode="forward")),
                trained(*bench.make_step("reweighter", w)))
    with pytest.raises(ValueError, match="meta_every must be a positive integer; got 0"):
        bench.make_reweighter_step(w, meta_every=0)


def test_bench_on_cuda_without_a_gpu_says_so(monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bench, "run_suite", lambda *args, **kwargs: pytest.fail("ran"))
    assert main(["bench", "--device", "cuda", "--quick"]) == 2
    assert capsys.readouterr().err.strip() == (
        "metafair-opt: error: --device cuda was asked for, but torch sees no CUDA device.")


def test_the_machine_description_names_the_gpu_on_cuda(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H100 80GB HBM3")
    described = bench.machine_description("cuda")
    assert ", GPU NVIDIA H100 80GB HBM3; " in described
    assert f"torch {torch.__version__} with {torch.get_num_threads()} threads" in described
    assert "GPU" not in bench.machine_description("cpu")


def test_memory_figures_keep_four_significant_figures() -> None:
    # W1's peaks are fractions of a megabyte and W2's thousands: one decimal would make W1's
    # variants look alike (0.2 MB each) and a fixed precision would clutter W2's.
    assert significant(0.23456) == 0.2346
    assert significant(0.0123456) == 0.01235
    assert significant(1861.44) == 1861.0
    assert significant(273.94) == 273.9
    assert significant(None) is None


def _memory_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "memory.py"
    spec = importlib.util.spec_from_file_location("benchmarks_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_memory_script_reports_the_thread_count_its_processes_ran_with(
        monkeypatch, capsys) -> None:
    script = _memory_script()
    asked = []

    def measured(workload, variant, threads, device):
        asked.append(threads)
        return {"peak_rss_mb": 2.0 if variant == "plain" else 3.0, "peak_live_mb": 1.0}

    monkeypatch.setattr(bench, "step_peak_memory_mb", measured)
    threads = torch.get_num_threads()
    try:
        assert script.main(["--workload", "mlp", "--threads", "1", "--repeats", "2"]) == 0
    finally:
        torch.set_num_threads(threads)
    text = capsys.readouterr().out
    assert asked == [1] * 2 * len(VARIANTS)
    assert "torch " in text and " with 1 threads" in text
    assert "each variant's median of 2 fresh process(es)" in text
    # live 1 MB, rss 3 MB (range 3 to 3) against plain's 2: 1.5x
    assert "| alignment | 1 | 3 | 3 | 3 | 1 | 1.5 |" in text


def test_the_memory_script_refuses_a_thread_count_that_is_not_positive(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        _memory_script().main(["--threads", "0"])
    assert exit_.value.code == 2


def test_the_suite_measures_and_checks_only_the_variants_asked_for(monkeypatch) -> None:
    measured, checked = [], []

    def check(w, device, pairs):
        checked.append(pairs)
        return {}

    def memory(workload, variant, *args):
        measured.append(variant)
        return {"peak_rss_mb": 1.0, "peak_live_mb": 2.0}

    monkeypatch.setattr(bench, "check_agreement", check)
    monkeypatch.setattr(bench, "step_peak_memory_mb", memory)
    monkeypatch.setattr(bench, "make_step", lambda variant, w, device: (lambda: None, None))
    records = bench.run_suite(["mlp"], quick=True,
                              variants=["higher_reweighter", "alignment_first_order"])
    assert [r["variant"] for r in records] == ["plain", "alignment_first_order",
                                               "higher_reweighter"]
    assert sorted(measured) == ["alignment_first_order", "higher_reweighter", "plain"]
    assert checked == [(
        ("alignment_first_order", ("higher_alignment_first_order",
                                   "torchfunc_alignment_first_order",
                                   "alignment_first_order_compiled")),
        ("reweighter", ("higher_reweighter",)),
    )]
    with pytest.raises(ValueError, match=r"^Unknown variant\(s\) \['nope'\]; choose from "):
        bench.run_suite(["mlp"], variants=["plain", "nope"])


def test_bench_refuses_an_unknown_variant(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--variants", "reweighter,nope"])
    assert exit_.value.code == 2
    assert "unknown variant(s) ['nope']; choose from plain, alignment," in capsys.readouterr().err
