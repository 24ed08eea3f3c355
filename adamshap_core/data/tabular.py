"""Tabular sources: the datasets bundled with scikit-learn, and csv:/parquet: files.

All of them go through ``tabular_dataset``: a seeded (stratified where possible)
train/val/test split, standardisation with the training split's statistics, and
seeded label noise that flips exactly ``round(label_noise * n_train)`` labels.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import UserError
from .dataset import Dataset
from .registry import register_source

if TYPE_CHECKING:
    from ..recipe import DataCfg

SKLEARN_NAMES = ("digits", "wine", "breast_cancer", "iris")


def _resolve_size(size: int | float, n: int) -> int:
    return int(size) if isinstance(size, int) else max(1, int(round(size * n)))


def split_indices(y: np.ndarray, val_size, test_size, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded train/val/test row indices; stratified by label when every class allows it."""
    from sklearn.model_selection import train_test_split

    n = len(y)
    n_val, n_test = _resolve_size(val_size, n), _resolve_size(test_size, n)
    if n_val + n_test > n - 2:
        raise UserError(
            f"`data.val_size` ({n_val}) plus `data.test_size` ({n_test}) leave fewer than 2 of the "
            f"{n} examples for training; expected smaller split sizes."
        )
    idx = np.arange(n)

    def split(ids, size):
        try:
            return train_test_split(ids, test_size=size, random_state=seed, stratify=y[ids])
        except ValueError:  # a class too small to stratify: plain seeded split
            return train_test_split(ids, test_size=size, random_state=seed)

    rest, test = split(idx, n_test)
    train, val = split(rest, n_val)
    return np.sort(train), np.sort(val), np.sort(test)


def flip_labels(y: np.ndarray, n_classes: int, frac: float, seed: int) -> np.ndarray:
    """Boolean mask of the ``round(frac * n)`` rows to flip; ``y`` is changed in place to another class."""
    n = len(y)
    n_flip = int(round(frac * n))
    noisy = np.zeros(n, dtype=bool)
    if n_flip == 0:
        return noisy
    rng = np.random.default_rng([seed, 7])
    rows = rng.permutation(n)[:n_flip]
    shift = rng.integers(1, n_classes, size=n_flip)  # 1..k-1: always a different class
    y[rows] = (y[rows] + shift) % n_classes
    noisy[rows] = True
    return noisy


def tabular_dataset(
    x: np.ndarray,
    labels: np.ndarray,
    cfg: DataCfg,
    *,
    source: str,
    image_shape: tuple[int, ...] | None = None,
    image: bool = False,
    feature_names: list[str] | None = None,
) -> Dataset:
    """Split, standardise and noise a feature matrix ``x`` [n, d] with raw labels ``labels`` [n]."""
    if len(x) == 0:
        raise UserError(f"`data.source` {source!r} holds no rows; expected a non-empty dataset.")
    classes, y = np.unique(labels, return_inverse=True)
    if len(classes) < 2:
        what = "`data.target`" if cfg.target else "`data.source`"
        raise UserError(
            f"{what}: the labels of {source!r} hold {len(classes)} distinct class(es); "
            "expected at least 2 for classification."
        )
    if image and image_shape is None:
        raise UserError(
            f"`model.kind` is cnn, which needs image data, but {source!r} is not an image dataset; "
            "expected model.kind: mlp (or an image source such as sklearn:digits)."
        )
    x = np.asarray(x, dtype=np.float64)
    names = list(feature_names or [f"x{i}" for i in range(x.shape[1])])
    train, val, test = split_indices(y, cfg.val_size, cfg.test_size, cfg.seed)
    _check_training_classes(y[train], classes, source, cfg)
    standardise = _standardiser(x, train, names, source)
    shape = tuple(image_shape) if image and image_shape is not None else (x.shape[1],)  # (refused above)

    def tx(rows):
        return torch.from_numpy(standardise(rows)).reshape(len(rows), *shape)

    y_train = y[train].copy()
    clean = y_train.copy()
    noisy = flip_labels(y_train, len(classes), cfg.label_noise, cfg.seed)
    return Dataset(
        source=source,
        x_train=tx(train),
        y_train=torch.from_numpy(y_train).long(),
        x_val=tx(val),
        y_val=torch.from_numpy(y[val]).long(),
        x_test=tx(test),
        y_test=torch.from_numpy(y[test]).long(),
        example_id=torch.arange(len(train), dtype=torch.long),
        is_noisy=torch.from_numpy(noisy),
        clean_label=torch.from_numpy(clean).long(),
        source_row=torch.from_numpy(train).long(),
        n_classes=len(classes),
        input_shape=shape,
        is_image=image,
        class_names=[str(c) for c in classes],
        feature_names=names,
    )


def _check_training_classes(y_train: np.ndarray, classes: np.ndarray, source: str, cfg: DataCfg) -> None:
    """A classifier needs two classes to learn from: the split may leave a rare one out of training."""
    present = np.unique(y_train)
    if len(present) < 2:
        raise UserError(
            f"`data.seed` {cfg.seed}: the training split of {source!r} holds only class "
            f"{classes[present[0]]!s} (the others fell into the validation and test splits); expected "
            "at least 2 classes there: more rows of the rare classes, smaller data.val_size / "
            "data.test_size, or another data.seed."
        )


# rows standardised at a time: the float64 temporaries stay small beside a large file's data
STANDARDISE_ROWS = 1 << 16


def _standardiser(x: np.ndarray, train: np.ndarray, names: list[str], source: str):
    """A function of row indices giving those rows of ``x`` standardised with the training rows'
    mean and std, as float32 (a constant column: centred), chunk by chunk."""
    with np.errstate(over="ignore", invalid="ignore"):
        x_train = x[train]
        mean, std = x_train.mean(axis=0), x_train.std(axis=0)
        del x_train
        std[std < 1e-12] = 1.0
    _refuse_overflow(np.isfinite(mean) & np.isfinite(std), names, source)

    def standardise(rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), x.shape[1]), dtype=np.float32)
        for start in range(0, len(rows), STANDARDISE_ROWS):
            part = out[start : start + STANDARDISE_ROWS]
            with np.errstate(over="ignore", invalid="ignore"):
                part[:] = (x[rows[start : start + len(part)]] - mean) / std
            _refuse_overflow(np.asarray(np.isfinite(part).all(axis=0)), names, source)
        return out

    return standardise


def _refuse_overflow(finite: np.ndarray, names: list[str], source: str) -> None:
    """Refuse the columns whose ``finite`` is False: their values overflowed standardising."""
    bad = [names[c] for c in np.flatnonzero(~finite)]
    if bad:
        more = " ..." if len(bad) > 5 else ""
        raise UserError(
            f"`data.source` {source!r}: feature column(s) {', '.join(bad[:5])}{more} hold values too "
            "large to standardise (their squares overflow a float64); expected values within about "
            "±1e150: rescale them."
        )


@register_source("sklearn", names=SKLEARN_NAMES, help="datasets bundled with scikit-learn, no download")
def load_sklearn(rest: str, cfg: DataCfg, *, image: bool = False) -> Dataset:
    from sklearn import datasets

    bunch = getattr(datasets, f"load_{rest}")()
    image_shape = (1, 8, 8) if rest == "digits" else None
    return tabular_dataset(
        bunch.data,
        bunch.target,
        cfg,
        source=f"sklearn:{rest}",
        image_shape=image_shape,
        image=image,
        feature_names=[str(f) for f in getattr(bunch, "feature_names", ())],
    )


def _frame_dataset(df, path: str, cfg: DataCfg, image: bool, source: str) -> Dataset:
    import pandas as pd

    if cfg.target not in df.columns:
        raise UserError(
            f"`data.target` is {cfg.target!r}, but {path} has no such column; "
            f"expected one of: {', '.join(map(str, df.columns))}."
        )
    if len(df) == 0:
        raise UserError(f"`data.source` {path} holds no rows; expected a non-empty table.")
    labels = df[cfg.target]
    if labels.isna().any():
        first = int(np.flatnonzero(labels.isna().to_numpy())[0])
        raise UserError(
            f"`data.target` column {cfg.target!r} of {path} has {int(labels.isna().sum())} empty cell(s), "
            f"the first in data row {first} (from 0); expected a label in each row."
        )
    if pd.api.types.is_float_dtype(labels) and not (labels % 1 == 0).all():
        example = labels[labels % 1 != 0].iloc[0]
        raise UserError(
            f"`data.target` column {cfg.target!r} of {path} holds fractional numbers (such as {example:g}); "
            "expected class labels (whole numbers or text): adamshap trains classifiers."
        )
    feats = df.drop(columns=[cfg.target])
    if feats.shape[1] == 0:
        raise UserError(f"`data.source` {path} has no feature columns besides the target {cfg.target!r}.")
    bad = [
        str(c)
        for c in feats.columns
        if not (pd.api.types.is_numeric_dtype(feats[c]) or pd.api.types.is_bool_dtype(feats[c]))
    ]
    if bad:
        raise UserError(
            f"`data.source` {path}: feature columns must be numeric, but {', '.join(bad[:5])}"
            f"{' ...' if len(bad) > 5 else ''} {'is' if len(bad) == 1 else 'are'} not; "
            "encode them as numbers or drop them."
        )
    x = feats.to_numpy(dtype=np.float64)
    names = [str(c) for c in feats.columns]
    del df, feats  # the caller passed the frame in alone: freed here, before the standardising copies
    bad_rows, bad_cols = np.nonzero(~np.isfinite(x))
    if len(bad_rows):
        r, c = bad_rows[0], bad_cols[0]
        value = "empty or NaN" if np.isnan(x[r, c]) else str(x[r, c])
        raise UserError(
            f"`data.source` {path}: the features contain {len(bad_rows)} empty or non-finite cell(s), the "
            f"first in data row {r} (from 0), column {names[c]!r} ({value}); expected numbers."
        )
    return tabular_dataset(
        x,
        labels.astype(str).to_numpy() if labels.dtype == object else labels.to_numpy(),
        cfg,
        source=source,
        image=image,
        feature_names=names,
    )


def _read(reader, path: str):
    try:
        return reader(path)
    except Exception as e:  # noqa: BLE001 -- any parse failure is bad input
        detail = " ".join(str(e).split()) or type(e).__name__
        raise UserError(f"`data.source`: cannot read {path}: {detail}.") from None


@register_source("csv", help="a CSV file with a header row; data.target names the label column")
def load_csv(rest: str, cfg: DataCfg, *, image: bool = False) -> Dataset:
    import pandas as pd

    path = str(Path(rest))
    return _frame_dataset(_read(pd.read_csv, path), path, cfg, image, f"csv:{path}")


@register_source("parquet", help="a Parquet file; data.target names the label column")
def load_parquet(rest: str, cfg: DataCfg, *, image: bool = False) -> Dataset:
    path = str(Path(rest))
    return _frame_dataset(_read_parquet(path), path, cfg, image, f"parquet:{path}")


def _read_parquet(path: str):
    import pandas as pd
    import pyarrow as pa

    df = _read(pd.read_parquet, path)
    pa.default_memory_pool().release_unused()  # Arrow's pool kept the table's memory (0.5 GB at 300k x 100)
    return df
