"""The shared unit-vector and softmax helpers against scikit-learn and SciPy on the same data."""

from __future__ import annotations

from aimv2_mlx.vectors import l2_normalize, softmax

import mlx.core as mx
import numpy as np
from scipy.special import softmax as scipy_softmax
from sklearn.preprocessing import normalize


def test_l2_normalize_matches_sklearn_for_numpy_and_mlx_and_keeps_zero_rows_zero(rng):
    x = rng.normal(size=(5, 7)).astype(np.float32) * 3
    x[2] = 0.0
    expected = normalize(x)
    assert np.abs(l2_normalize(x) - expected).max() <= 1e-6
    got = l2_normalize(mx.array(x))
    assert isinstance(got, mx.array) and got.dtype == mx.float32
    assert np.abs(np.array(got) - expected).max() <= 1e-6
    assert not np.array(got)[2].any()


def test_l2_normalize_works_along_the_last_axis_of_token_arrays(rng):
    x = rng.normal(size=(2, 3, 4))
    assert np.abs(l2_normalize(x) - normalize(x.reshape(-1, 4)).reshape(x.shape)).max() <= 1e-12


def test_softmax_matches_scipy_and_survives_large_logits(rng):
    logits = rng.normal(size=(4, 6)).astype(np.float32) * 50 + 1000
    got = softmax(logits)
    assert got.dtype == np.float32 and np.isfinite(got).all()
    assert np.abs(got - scipy_softmax(logits.astype(np.float64), axis=-1)).max() <= 1e-6
