"""The papers' tabular comparisons end to end: train, post-process, measure, tabulate, plot.

:func:`run_comparison` produces one row per (seed, method) with fairlearn's figures on the test
split; :func:`summarize` turns them into mean ± std per method. Every row says whether the
method needs the sensitive attribute at prediction time (post-processing does; FaAlGrad and
FORML do not), so the tables compare like with like.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from metafair_opt.integrations.tabular.models import PAPER_SETTINGS, ModelSettings
from metafair_opt.integrations.tabular.postprocess import (
    THRESHOLDS,
    exponentiated_gradient,
    group_threshold,
    probabilities,
    threshold_optimizer,
    threshold_predictions,
)
from metafair_opt.integrations.tabular.training import (
    MethodSpec,
    Splits,
    make_splits,
    parse_ratio,
    train,
)
from tqdm.auto import tqdm

from metafair_opt.datasets import load_tabular
from metafair_opt.metrics import BINARY_METRICS, binary_fairness_report
from metafair_opt.reporting import markdown_table

__all__ = [
    "METHODS",
    "ComparisonConfig",
    "plot_tradeoff",
    "run_comparison",
    "run_sweep",
    "summarize",
    "write_results",
]

#: Method names accepted by ``--methods``.
METHODS = (
    "baseline", "faalgrad", "forml", "threshold", "threshold_optimizer",
    "exponentiated_gradient", "majority",
)
HEADLINE = ("accuracy", "dp_diff", "eo_diff")


@dataclass
class ComparisonConfig:
    """Everything that defines a comparison run (saved as the run's JSON configuration)."""

    dataset: str = "compas"
    methods: Sequence[str] = ("baseline", "faalgrad", "threshold", "majority")
    configs: Sequence[int] = (1, 2)
    inner_steps: Sequence[int] = (1,)
    controls: bool = True
    split_ratios: Sequence[str] = ()
    swap: bool = False
    seeds: int = 3
    epochs: int | None = 10
    steps: int | None = None
    data_dir: str | None = None
    inner_lr: float | None = None
    weight_lr: float = 0.01
    weight_optimizer: str = "adam"
    meta_loss: str = "mean_loss_discrepancy"
    forml_val_rows: str = "all"
    report: Sequence[str] = HEADLINE
    selection: str = "best"
    settings: dict[str, Any] = field(default_factory=dict)

    def model_settings(self) -> ModelSettings:
        base = PAPER_SETTINGS.get(self.dataset, ModelSettings())
        return ModelSettings(**{**asdict(base), **self.settings})

    def trained_methods(self) -> list[MethodSpec]:
        """The methods that need training, controls included."""
        specs: list[MethodSpec] = []
        wanted = set(self.methods)
        unknown = wanted - set(METHODS)
        if unknown:
            raise ValueError(f"Unknown method(s) {sorted(unknown)}; choose from {list(METHODS)}.")
        if wanted & {"baseline", "threshold", "threshold_optimizer"}:
            specs.append(MethodSpec("baseline"))
        if "faalgrad" in wanted:
            steps = list(self.inner_steps)
            if self.controls and 0 not in steps:
                steps = [0, *steps]
            variants: list[dict[str, Any]] = (
                [{"split_ratio": r} for r in self.split_ratios] if self.split_ratios
                else [{"config": c} for c in self.configs]
            )
            for variant in variants:
                for inner in steps:
                    specs.append(MethodSpec("faalgrad", inner_steps=inner, swap=self.swap,
                                            inner_lr=self.inner_lr, **variant))
        if "forml" in wanted:
            specs.append(MethodSpec("forml", weight_lr=self.weight_lr,
                                    weight_optimizer=self.weight_optimizer,
                                    meta_loss=self.meta_loss, val_rows=self.forml_val_rows))
        return specs


def _row(dataset: str, seed: int, method: str, family: str, needs_sensitive: bool,
         data: Splits, predictions: np.ndarray, **extra: Any) -> dict[str, Any]:
    report = binary_fairness_report(data.y["test"].numpy(), predictions,
                                    data.group["test"].numpy())
    return {"dataset": dataset, "seed": seed, "method": method, "family": family,
            "sensitive_at_prediction": needs_sensitive, **report, **extra}


def _family(spec: MethodSpec) -> str:
    if spec.kind == "faalgrad" and spec.inner_steps == 0:
        return "control"
    return "baseline" if spec.kind == "baseline" else "in-processing"


def run_comparison(config: ComparisonConfig, quiet: bool = False) -> pd.DataFrame:
    """Train and evaluate every requested method for every seed; one row per (seed, method)."""
    if config.seeds < 1:
        raise ValueError(f"seeds is the number of seeds (0, 1, ...) to run and must be at "
                         f"least 1; got {config.seeds}.")
    unknown = [m for m in config.report if m not in BINARY_METRICS]
    if unknown:
        raise ValueError(f"Unknown metric(s) {unknown}; choose from {list(BINARY_METRICS)}.")
    ds = load_tabular(config.dataset, data_dir=config.data_dir)
    settings = config.model_settings()
    specs = config.trained_methods()
    wanted = set(config.methods)
    groups = sorted(ds.group.unique().tolist())
    if len(groups) > 2 and wanted & {"faalgrad", "threshold"}:
        raise ValueError(
            f"{config.dataset} has {len(groups)} groups; FaAlGrad's configs and the "
            "protected-group threshold are defined for two. Use baseline, forml, "
            "threshold_optimizer, exponentiated_gradient or majority here (RoundRobin in the "
            "Python API covers several groups)."
        )
    for ratio in config.split_ratios:
        fraction = parse_ratio(ratio)
        share = float((ds.group == (0 if config.swap else 1)).mean())
        if fraction > share:
            raise ValueError(
                f"Split ratio {ratio} puts {fraction:.0%} of each batch in X_s, but the support "
                f"group is only {share:.0%} of {config.dataset}; choose a smaller X_s share."
            )
    rows: list[dict[str, Any]] = []
    runs = tqdm(total=config.seeds * max(1, len(specs)), desc=f"{config.dataset}",
                disable=quiet, unit="run")
    for seed in range(config.seeds):
        data = make_splits(ds, seed)
        if "majority" in wanted:
            majority = int(data.y["train"].float().mean() >= 0.5)
            rows.append(_row(config.dataset, seed, "majority class", "control", False, data,
                             np.full(data.y["test"].shape[0], majority)))
        for spec in specs:
            runs.set_postfix_str(f"seed {seed} {spec.label}")
            epoch_bar = tqdm(desc=spec.label, leave=False, disable=quiet, unit="eval")

            def progress(done: int, total: int, bar=epoch_bar) -> None:
                bar.total = total
                bar.update(done - bar.n)

            scores = train(spec, data, settings, seed, epochs=config.epochs, steps=config.steps,
                           progress=progress, selection=config.selection)
            epoch_bar.close()
            extra: dict[str, Any] = {"best_eval": scores.best_epoch}
            if scores.alignment:
                extra["mean_alignment"] = float(np.mean(scores.alignment))
            if spec.split_ratio is not None:
                extra["clipped_batches"] = scores.clipped_batches
            if scores.weights is not None:
                extra["weight_min"] = float(scores.weights.min())
                extra["weight_max"] = float(scores.weights.max())
            if spec.kind != "baseline" or "baseline" in wanted:
                rows.append(_row(config.dataset, seed, spec.label, _family(spec), False, data,
                                 (scores.test > 0).astype(int), **extra))
            if spec.kind == "baseline" and "threshold_optimizer" in wanted:
                rows.append(_row(config.dataset, seed, "ThresholdOptimizer (fairlearn)",
                                 "post-processing", True, data,
                                 threshold_optimizer(scores.val, scores.test, data, seed)))
            is_control = spec.kind == "faalgrad" and spec.inner_steps == 0
            if "threshold" in wanted and not is_control:
                predictions, chosen = group_threshold(scores.val, scores.test, data)
                name = "threshold" if spec.kind == "baseline" else f"{spec.label} + threshold"
                rows.append(_row(config.dataset, seed, name, "post-processing", True, data,
                                 predictions, protected_threshold=chosen))
            runs.update(1)
        if "exponentiated_gradient" in wanted:
            rows.append(_row(config.dataset, seed, "ExponentiatedGradient (fairlearn)",
                             "reference", False, data, exponentiated_gradient(data, seed)))
    runs.close()
    return pd.DataFrame(rows)


def summarize(results: pd.DataFrame, metrics: Sequence[str] = HEADLINE) -> pd.DataFrame:
    """Mean ± std over seeds per method, in the order methods first appear."""
    order = list(dict.fromkeys(results["method"]))
    grouped = results.groupby("method", sort=False)
    table = pd.DataFrame(index=pd.Index(order, name="method"))
    first = grouped.first()
    table["family"] = first["family"]
    table["needs sensitive attr. at prediction"] = first["sensitive_at_prediction"].map(
        {True: "yes", False: "no"})
    table["seeds"] = grouped.size()
    for metric in metrics:
        mean, std = grouped[metric].mean(), grouped[metric].std(ddof=1).fillna(0.0)
        scale = 100.0 if metric == "accuracy" else 1.0
        digits = 1 if metric == "accuracy" else 3
        table[metric] = [f"{mean[m] * scale:.{digits}f} ± {std[m] * scale:.{digits}f}"
                         for m in order]
    if "weight_min" in results:
        low, high = grouped["weight_min"].min(), grouped["weight_max"].max()
        table["normalised weights (min-max)"] = [
            "" if pd.isna(low[m]) else f"{low[m]:.3f}-{high[m]:.3f}" for m in order
        ]
    return table.reset_index()


def write_results(results: pd.DataFrame, config: ComparisonConfig | dict[str, Any], out: Path,
                  command: str) -> pd.DataFrame:
    """Write results.csv (per seed), results.md (summary) and config.json into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    report = config.report if isinstance(config, ComparisonConfig) else HEADLINE
    summary = summarize(results, report)
    results.to_csv(out / "results.csv", index=False)
    config_dict = asdict(config) if isinstance(config, ComparisonConfig) else dict(config)
    (out / "config.json").write_text(json.dumps({"command": command, **config_dict}, indent=2,
                                                default=list))
    header = (f"Command: `{command}`\n\nAccuracy in %, mean ± std over seeds, test split. "
              "Normalised weights: softmax of the learned table times its size (1 = uniform)."
              "\n\n")
    (out / "results.md").write_text(header + markdown_table(summary) + "\n")
    return summary


def run_sweep(dataset: str, ratios: Sequence[str], inner_lrs: Sequence[float | None],
              inner_steps: int, seeds: int, epochs: int | None, data_dir: str | None,
              quiet: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """FaAlGrad over split ratios × inner learning rates, and the baseline threshold curve.

    Returns (per-seed rows of the FaAlGrad runs and baseline, threshold-curve points).
    """
    ds = load_tabular(dataset, data_dir=data_dir)
    settings = PAPER_SETTINGS.get(dataset, ModelSettings())
    share = float((ds.group == 1).mean())
    usable = [r for r in ratios if parse_ratio(r) <= share]
    if not usable:
        raise ValueError(f"None of the split ratios {list(ratios)} fit {dataset}: the protected "
                         f"group is {share:.0%} of the rows.")
    specs = [MethodSpec("baseline")] + [
        MethodSpec("faalgrad", split_ratio=r, inner_steps=inner_steps, inner_lr=lr)
        for r in usable for lr in inner_lrs
    ]
    rows, curve = [], []
    bar = tqdm(total=seeds * len(specs), desc=f"sweep {dataset}", disable=quiet, unit="run")
    for seed in range(seeds):
        data = make_splits(ds, seed)
        for spec in specs:
            scores = train(spec, data, settings, seed, epochs=epochs)
            rows.append(_row(dataset, seed, spec.label, _family(spec), False, data,
                             (scores.test > 0).astype(int), split_ratio=spec.split_ratio,
                             clipped_batches=scores.clipped_batches,
                             inner_lr=spec.inner_lr if spec.inner_lr is not None
                             else settings.inner_lr))
            if spec.kind == "baseline":
                prob = probabilities(scores.test)
                for t in THRESHOLDS:
                    predictions = threshold_predictions(prob, data.group["test"].numpy(), t)
                    report = binary_fairness_report(data.y["test"].numpy(), predictions,
                                                     data.group["test"].numpy())
                    curve.append({"seed": seed, "protected_threshold": t, **report})
            bar.update(1)
    bar.close()
    skipped = sorted(set(ratios) - set(usable))
    results = pd.DataFrame(rows)
    results.attrs["skipped_ratios"] = skipped
    return results, pd.DataFrame(curve)


def plot_tradeoff(results: pd.DataFrame, curve: pd.DataFrame, path: Path, title: str) -> None:
    """Accuracy against DP difference (Figure 2 of the FaAlGrad paper), saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    points = curve.groupby("protected_threshold")[["dp_diff", "accuracy"]].mean()
    ax.plot(points["dp_diff"], points["accuracy"] * 100, "o-", color="grey",
            label="baseline + protected-group threshold 0.1 ... 1.0")
    means = results.groupby("method", sort=False)[["dp_diff", "accuracy"]].mean()
    for method, row in means.iterrows():
        marker = "s" if method == "baseline" else "^"
        ax.scatter(row["dp_diff"], row["accuracy"] * 100, marker=marker, s=50, label=method)
    ax.set_xlabel("demographic parity difference (test)")
    ax.set_ylabel("accuracy % (test)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
