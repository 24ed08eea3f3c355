"""Datasets: seeded splits, train-split standardisation, exact label noise, csv/parquet errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from adamshap_core.data import load_dataset
from adamshap_core.data.tabular import flip_labels, split_indices
from adamshap_core.errors import UserError
from adamshap_core.recipe import DataCfg


def cfg(**kw) -> DataCfg:
    return DataCfg(**{"source": "sklearn:digits", "val_size": 200, "test_size": 300, **kw})


@pytest.mark.parametrize(
    "name, n, k, d",
    [("digits", 1797, 10, 64), ("wine", 178, 3, 13), ("breast_cancer", 569, 2, 30), ("iris", 150, 3, 4)],
)
def test_builtin_sources(name, n, k, d):
    ds = load_dataset(cfg(source=f"sklearn:{name}", val_size=0.1, test_size=0.2))
    assert ds.n_classes == k and ds.input_shape == (d,)
    assert ds.n_train + len(ds.y_val) + len(ds.y_test) == n
    assert ds.example_id.tolist() == list(range(ds.n_train))
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.long


def test_splits_are_disjoint_seeded_and_stratified():
    y = np.repeat(np.arange(4), 50)
    a = split_indices(y, 40, 0.2, seed=3)
    b = split_indices(y, 40, 0.2, seed=3)
    c = split_indices(y, 40, 0.2, seed=4)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not np.array_equal(a[0], c[0])
    train, val, test = a
    assert len(val) == 40 and len(test) == 40 and len(train) == 120
    assert len(set(train) | set(val) | set(test)) == 200
    assert np.bincount(y[val]).tolist() == [10, 10, 10, 10]  # stratified


def test_standardised_with_training_statistics():
    ds = load_dataset(cfg(source="sklearn:wine", val_size=30, test_size=30))
    m, s = ds.x_train.mean(0), ds.x_train.std(0, unbiased=False)
    assert torch.allclose(m, torch.zeros_like(m), atol=1e-5)
    assert torch.allclose(s, torch.ones_like(s), atol=1e-4)
    assert ds.x_val.mean(0).abs().max() > 1e-3  # val uses the train statistics, not its own


def test_standardised_chunk_by_chunk_as_the_whole_matrix_at_once(tmp_path, monkeypatch):
    """Rows are standardised a chunk at a time (a large file's float64 copies stayed beside it): the
    values are bit for bit those of the whole matrix, and a value that overflows in any split's
    chunk is refused naming its column."""
    from adamshap_core.data import tabular

    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 5.0, size=(103, 4)) * np.array([1.0, 1e-3, 1e3, 1.0])
    df = pd.DataFrame(x, columns=["a", "b", "c", "d"]).assign(y=rng.integers(0, 3, size=103))
    df.to_csv(tmp_path / "t.csv", index=False)
    data = cfg(source=f"csv:{tmp_path / 't.csv'}", target="y", val_size=20, test_size=20)
    monkeypatch.setattr(tabular, "STANDARDISE_ROWS", 7)
    ds = load_dataset(data)
    train, val, test = split_indices(df["y"].to_numpy(), 20, 20, 0)
    mean, std = x[train].mean(axis=0), x[train].std(axis=0)
    for rows, got in ((train, ds.x_train), (val, ds.x_val), (test, ds.x_test)):
        assert np.array_equal(got.numpy(), ((x[rows] - mean) / std).astype(np.float32))
    df.loc[val[3], "c"] = 1.7e308  # finite, and finite training statistics: only the value overflows
    df.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(UserError, match=r"feature column\(s\) c hold values too large to standardise"):
        load_dataset(data)


@pytest.mark.parametrize("frac", [0.0, 0.1, 0.2, 0.55])
def test_label_noise_flips_exactly_round_frac_n(frac):
    ds = load_dataset(cfg(label_noise=frac))
    n = ds.n_train
    assert int(ds.is_noisy.sum()) == int(round(frac * n))
    changed = ds.y_train != ds.clean_label
    assert torch.equal(changed, ds.is_noisy)  # every flipped label went to another class
    assert int(ds.y_train.max()) < ds.n_classes
    again = load_dataset(cfg(label_noise=frac))
    assert torch.equal(again.y_train, ds.y_train) and torch.equal(again.x_train, ds.x_train)


def test_flip_labels_binary_always_flips():
    y = np.zeros(100, dtype=int)
    noisy = flip_labels(y, 2, 0.3, seed=0)
    assert noisy.sum() == 30 and (y[noisy] == 1).all() and (y[~noisy] == 0).all()


def test_digits_as_images_for_cnn_and_refusal_elsewhere():
    ds = load_dataset(cfg(), image=True)
    assert ds.input_shape == (1, 8, 8) and ds.x_train.shape[1:] == (1, 8, 8) and ds.is_image
    with pytest.raises(UserError, match="`model.kind` is cnn"):
        load_dataset(cfg(source="sklearn:iris", val_size=10, test_size=10), image=True)


def test_split_too_large_is_a_user_error():
    with pytest.raises(UserError, match="`data.val_size`"):
        load_dataset(cfg(source="sklearn:iris", val_size=100, test_size=49))


def _csv(tmp_path, df, name="t.csv"):
    p = tmp_path / name
    df.to_csv(p, index=False) if name.endswith(".csv") else df.to_parquet(p, index=False)
    return p


def test_csv_and_parquet(tmp_path):
    rng = np.random.default_rng(0)
    df = pd.DataFrame(rng.normal(size=(60, 3)), columns=["a", "b", "c"])
    df["label"] = np.where(df["a"] > 0, "pos", "neg")
    for name in ["t.csv", "t.parquet"]:
        p = _csv(tmp_path, df, name)
        scheme = name.split(".")[1]
        ds = load_dataset(DataCfg(source=f"{scheme}:{p}", target="label", val_size=10, test_size=10))
        assert ds.n_classes == 2 and ds.class_names == ["neg", "pos"] and ds.input_shape == (3,)
        assert ds.feature_names == ["a", "b", "c"] and ds.n_train == 40


@pytest.mark.parametrize(
    "df, target, fragment",
    [
        (pd.DataFrame({"a": [1.0, 2.0] * 10, "y": [0, 1] * 10}), "label", "`data.target` is 'label'"),
        (pd.DataFrame({"a": ["x", "y"] * 10, "y": [0, 1] * 10}), "y", "must be numeric"),
        (pd.DataFrame({"a": [1.0] * 20, "y": [1] * 20}), "y", "at least 2"),
        (pd.DataFrame({"a": pd.Series([], dtype=float), "y": pd.Series([], dtype=int)}), "y", "no rows"),
        (pd.DataFrame({"y": [0, 1] * 10}), "y", "no feature columns"),
        (
            pd.DataFrame({"a": [1.0, None] * 10, "y": [0, 1] * 10}),
            "y",
            r"10 empty or non-finite cell\(s\), the first in data row 1 \(from 0\), column 'a' "
            r"\(empty or NaN\)",
        ),
        (
            pd.DataFrame({"a": [1.0, 2.0, 3.0, -np.inf] * 5, "y": [0, 1] * 10}),
            "y",
            r"5 empty or non-finite cell\(s\), the first in data row 3 \(from 0\), column 'a' \(-inf\)",
        ),
    ],
)
def test_csv_problems_are_user_errors(tmp_path, df, target, fragment):
    p = _csv(tmp_path, df)
    with pytest.raises(UserError, match=fragment):
        load_dataset(DataCfg(source=f"csv:{p}", target=target, val_size=2, test_size=2))


def test_unparseable_csv(tmp_path):
    p = tmp_path / "bad.parquet"
    p.write_text("not parquet")
    with pytest.raises(UserError, match="`data.source`: cannot read"):
        load_dataset(DataCfg(source=f"parquet:{p}", target="y"))


@pytest.mark.parametrize(
    "cfg",
    [
        DataCfg(source="sklearn:iris", val_size=20, test_size=30, label_noise=0.2),
        DataCfg(source="builtin:facts"),
    ],
    ids=["tabular", "text"],
)
def test_a_subset_keeps_the_chosen_training_rows_and_every_other_field(cfg):
    import dataclasses

    data = load_dataset(cfg)
    keep = [5, 0, 3]
    sub = data.subset(keep)
    assert type(sub) is type(data)
    per_row = {"x_train", "y_train", "example_id", "is_noisy", "clean_label", "source_row", "texts"}
    for f in dataclasses.fields(data):
        got, full = getattr(sub, f.name), getattr(data, f.name)
        if f.name in per_row:
            want = [full[i] for i in keep] if isinstance(full, list) else full[torch.tensor(keep)]
            assert (got == want) if isinstance(full, list) else torch.equal(got, want), f.name
        else:
            assert got is full, f.name


def test_fractional_split_sizes_round_to_the_nearest_count():
    """wine has 178 rows: 0.1 of them is 17.8, so 18 validation rows; 0.2 is 35.6, so 36 test rows."""
    ds = load_dataset(cfg(source="sklearn:wine", val_size=0.1, test_size=0.2))
    assert (len(ds.y_val), len(ds.y_test), ds.n_train) == (18, 36, 178 - 18 - 36)


def test_a_column_whose_spread_overflows_is_refused_even_with_a_finite_mean(tmp_path):
    """±1e200 has a mean of 0 but squares past float64: standardised, it would be zeros, silently."""
    rng = np.random.default_rng(0)
    big = np.where(np.arange(60) % 2 == 0, 1e200, -1e200)
    df = pd.DataFrame({"a": rng.normal(size=60), "big": big, "y": np.arange(60) % 3})
    df.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(UserError, match=r"feature column\(s\) big hold values too large"):
        load_dataset(cfg(source=f"csv:{tmp_path / 't.csv'}", target="y", val_size=10, test_size=10))
