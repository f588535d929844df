"""Probe heads against references: scikit-learn on Fashion-MNIST features (linear, kNN), a NumPy
attention-pooling forward, and a task only attention pooling can solve (where an object sits)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import aimv2_mlx
from aimv2_mlx.probe.attentive import AttentiveSettings, head_scores, new_head, train_attentive
from aimv2_mlx.probe.knn import KnnHead
from aimv2_mlx.probe.linear import fit_logistic, train_linear
from aimv2_mlx.probe.metrics import classification_metrics

import mlx.core as mx
import numpy as np
import pytest

from .conftest import tiny_config

_spec = importlib.util.spec_from_file_location(
    "fashion_mnist", Path(__file__).resolve().parents[1] / "bench" / "fashion_mnist.py"
)
fashion_mnist = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fashion_mnist)  # the bench's reader, by path: sys.path stays as it was

FASHION_TRAIN, FASHION_TEST = 12_000, 3_000


@pytest.fixture(scope="module")
def fashion_features():
    """Mean-pooled features of a fixed random-init tiny encoder (28 px, 4 patches) on
    Fashion-MNIST.
    """
    if not fashion_mnist.available():
        pytest.skip(
            "Fashion-MNIST is not installed (Debian package dataset-fashion-mnist; CI's setup "
            "installs it)"
        )
    mx.random.seed(0)
    config = tiny_config()
    config.vision.image_size = 28
    model = aimv2_mlx.build(config)
    model.preprocessor.pos_embed = mx.random.normal(model.preprocessor.pos_embed.shape) * 0.5

    def features(images: np.ndarray) -> np.ndarray:
        pixels = np.repeat(images[..., None], 3, axis=-1).astype(np.float32) / 255.0
        pixels = (pixels - 0.5) / 0.25
        return np.concatenate(
            [
                np.array(model(mx.array(pixels[i : i + 1000])).mean(axis=1))
                for i in range(0, len(pixels), 1000)
            ]
        )

    train_x, train_y = fashion_mnist.read_split("train")
    test_x, test_y = fashion_mnist.read_split("t10k")
    return (
        features(train_x[:FASHION_TRAIN]),
        train_y[:FASHION_TRAIN],
        features(test_x[:FASHION_TEST]),
        test_y[:FASHION_TEST],
    )


def test_linear_probe_matches_sklearn_on_fashion_mnist(fashion_features, C=1.0):
    sklearn = pytest.importorskip("sklearn.linear_model", reason="scikit-learn is a test extra")
    train_x, train_y, test_x, test_y = fashion_features
    ours = fit_logistic(train_x, train_y, 10, C=C)
    reference = sklearn.LogisticRegression(C=C, max_iter=2000).fit(train_x, train_y)
    our_accuracy = (ours.scores(test_x).argmax(1) == test_y).mean()
    their_accuracy = reference.score(test_x, test_y)
    print(f"C={C}: ours {our_accuracy:.4f}, scikit-learn {their_accuracy:.4f}")
    assert our_accuracy > 0.5  # the features carry signal: far above chance (0.1)
    assert abs(our_accuracy - their_accuracy) <= 0.005


@pytest.mark.parametrize("k", [10, 20, 100, 200])
def test_knn_predictions_match_sklearn_on_fashion_mnist(fashion_features, k):
    neighbors = pytest.importorskip("sklearn.neighbors", reason="scikit-learn is a test extra")
    train_x, train_y, test_x, _ = fashion_features
    ours = KnnHead(train_x, train_y, 10, k).scores(test_x).argmax(1)
    # the same vote: weight exp(cos / T), cosine similarity = 1 - cosine distance
    weights = lambda distance: np.exp((1.0 - distance - 1.0) / 0.07)  # noqa: E731
    reference = neighbors.KNeighborsClassifier(n_neighbors=k, metric="cosine", weights=weights)
    theirs = reference.fit(train_x, train_y).predict(test_x)
    assert (ours == theirs).mean() >= 0.995


def test_attention_pool_head_matches_numpy(rng):
    dims, heads, classes = 48, 3, 5
    head = new_head(dims, classes, heads, seed=3)
    head.linear.bias = mx.random.normal((classes,))
    tokens = rng.standard_normal((4, 9, dims)).astype(np.float32)
    p = {
        k: np.array(v, dtype=np.float64)
        for k, v in [
            ("q", head.cls_token),
            ("k", head.k.weight),
            ("v", head.v.weight),
            ("w", head.linear.weight),
            ("b", head.linear.bias),
        ]
    }
    x = tokens.astype(np.float64)
    d = dims // heads
    q = p["q"].reshape(1, heads, d)  # the learned query is used directly
    k = (x @ p["k"].T).reshape(4, 9, heads, d)
    v = (x @ p["v"].T).reshape(4, 9, heads, d)
    logits = np.einsum("qhd,bnhd->bhqn", q, k) / np.sqrt(d)
    attention = np.exp(logits - logits.max(-1, keepdims=True))
    attention /= attention.sum(-1, keepdims=True)
    pooled = np.einsum("bhqn,bnhd->bqhd", attention, v).reshape(4, 1, dims).mean(axis=1)
    expected = pooled @ p["w"].T + p["b"]
    assert np.abs(np.array(head(mx.array(tokens))) - expected).max() <= 1e-5


def _object_position_task(rng, n: int):
    """Noise images with one coloured square; the label is the quadrant it sits in."""
    images = rng.uniform(0, 0.5, (n, 56, 56, 3)).astype(np.float32)
    labels = rng.integers(0, 4, n)
    for i, quadrant in enumerate(labels):
        top, left = (
            (quadrant // 2) * 28 + rng.integers(0, 14),
            (quadrant % 2) * 28 + rng.integers(0, 14),
        )
        images[i, top : top + 14, left : left + 14] = rng.uniform(0, 1, 3)
    return (images - 0.5) / 0.25, labels


def test_attentive_probe_beats_mean_pooled_linear_on_object_position(rng):
    mx.random.seed(0)
    # sin-cos positions: tokens know where they are
    model = aimv2_mlx.build(tiny_config(native=True))

    def tokens(images):
        return np.concatenate(
            [np.array(model(mx.array(images[i : i + 100]))) for i in range(0, len(images), 100)]
        )

    (train_x, train_y), (val_x, val_y), (test_x, test_y) = (
        _object_position_task(rng, n) for n in (800, 200, 400)
    )
    train_t, val_t, test_t = tokens(train_x), tokens(val_x), tokens(test_x)
    linear, _ = train_linear((train_t.mean(1), train_y), (val_t.mean(1), val_y), 4)
    linear_accuracy = (linear.scores(test_t.mean(1)).argmax(1) == test_y).mean()
    attentive, _ = train_attentive(
        (train_t, train_y), (val_t, val_y), 4, AttentiveSettings(epochs=20, batch_size=64)
    )
    attentive_accuracy = (head_scores(attentive, test_t).argmax(1) == test_y).mean()
    print(f"linear on mean-pooled {linear_accuracy:.3f}, attentive {attentive_accuracy:.3f}")
    assert attentive_accuracy >= linear_accuracy + 0.10


def test_metrics_from_known_predictions():
    classes = ["a", "b", "c", "d", "e"]
    labels = np.array([0, 0, 1, 2, 3, 4, 4, 4])
    scores = np.eye(5)[[0, 1, 1, 2, 3, 4, 4, 0]] + 0.01 * np.arange(5)  # two mistakes
    metrics = classification_metrics(scores, labels, classes)
    assert metrics["top1"] == 6 / 8
    assert metrics["per_class"]["a"] == {"precision": 0.5, "recall": 0.5, "support": 2}
    assert metrics["per_class"]["e"]["recall"] == 2 / 3
    assert metrics["balanced_accuracy"] == pytest.approx((0.5 + 1 + 1 + 1 + 2 / 3) / 5)
    assert metrics["top5"] == 1.0 and np.array(metrics["confusion_matrix"]).sum() == 8
