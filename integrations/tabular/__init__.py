"""Tabular integration: the papers' MLPs and data sets, training, post-processing, experiments.

Installed as ``metafair_opt.integrations.tabular``; the ``metafair-opt run`` and
``metafair-opt sweep`` commands are thin wrappers over :mod:`.experiment`.
"""

from metafair_opt.integrations.tabular.experiment import (
    ComparisonConfig,
    run_comparison,
    run_sweep,
    summarize,
    write_results,
)
from metafair_opt.integrations.tabular.models import PAPER_SETTINGS, ModelSettings, build_mlp
from metafair_opt.integrations.tabular.training import MethodSpec, Splits, make_splits, train

__all__ = [
    "PAPER_SETTINGS",
    "ComparisonConfig",
    "MethodSpec",
    "ModelSettings",
    "Splits",
    "build_mlp",
    "make_splits",
    "run_comparison",
    "run_sweep",
    "summarize",
    "train",
    "write_results",
]
