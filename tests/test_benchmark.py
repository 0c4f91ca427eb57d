"""The benchmark harness: peers agree with our steps, and `metafair-opt bench` prints and writes
the records the benchmarks issue specifies (W1 only, --quick; timings are not asserted)."""

from __future__ import annotations

import json
import math
from unittest.mock import patch

import torch

from metafair_opt.benchmark import (
    VARIANTS,
    check_agreement,
    make_workload,
    significant,
    time_interleaved,
    time_pairwise,
)
from metafair_opt.cli import main


def test_every_peer_agrees_with_our_steps_on_the_mlp() -> None:
    report = check_agreement(make_workload("mlp"))
    assert set(report) == {
        "alignment vs higher_alignment", "alignment vs torchfunc_alignment",
        "alignment vs alignment_compiled", "alignment vs alignment_recompute",
        "alignment_first_order vs alignment_first_order_compiled",
        "reweighter vs higher_reweighter", "reweighter vs torchfunc_reweighter",
        "reweighter vs higher_reweighter (weight update)",
        "reweighter vs torchfunc_reweighter (weight update)",
        "reweighter vs reweighter_compiled",
        "reweighter vs reweighter_compiled (weight update)",
        "reweighter vs reweighter_recompute",
        "reweighter vs reweighter_recompute (weight update)",
    }
    for key, value in report.items():
        assert not math.isnan(value), key  # NaN: our weight table did not move
        assert value < 1e-5, (key, value)


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
    import metafair_opt.benchmark as bench

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
