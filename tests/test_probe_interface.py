"""One probe-head interface: a probe folder in the format `aimv2 probe` writes loads into heads
whose probabilities match NumPy references, and a head registered once is trained, saved,
scored and loaded without any other code knowing its type."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import aimv2_mlx
from aimv2_mlx.errors import UnusableFileError
from aimv2_mlx.probe import HEAD_TYPES, AttentiveSettings, ProbeSettings, load_probe, probe
from aimv2_mlx.probe.features import extract

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from .conftest import tiny_config

DIMS, HEADS, CLASSES, TOKENS = 16, 2, 3, 5


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _attention_pool(p: dict, x: np.ndarray) -> np.ndarray:
    """apple/ml-aim's attention-pooling head in NumPy: one learned query attends over the tokens."""
    n, t, _ = x.shape
    d = DIMS // HEADS
    q = p["cls_token"].reshape(1, HEADS, d)
    k = (x @ p["k.weight"].T).reshape(n, t, HEADS, d)
    v = (x @ p["v.weight"].T).reshape(n, t, HEADS, d)
    attention = _softmax_last(np.einsum("qhd,bnhd->bhqn", q, k) / np.sqrt(d))
    pooled = np.einsum("bhqn,bnhd->bqhd", attention, v).reshape(n, DIMS)
    return pooled @ p["linear.weight"].T + p["linear.bias"]


def _softmax_last(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _knn_votes(
    bank: np.ndarray, labels: np.ndarray, queries: np.ndarray, k: int, temperature: float
) -> np.ndarray:
    """Brute force: cosine similarity, the k most similar vote exp((s - 1) / T) for their class."""
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    sims = unit(queries) @ unit(bank).T
    votes = np.zeros((len(queries), CLASSES))
    for row, sim in enumerate(sims):
        for j in np.argsort(-sim)[:k]:
            votes[row, labels[j]] += np.exp((sim[j] - 1) / temperature)
    return votes / votes.sum(1, keepdims=True)


@pytest.fixture
def saved_folder(tmp_path) -> tuple[Path, dict]:
    """A probe folder written by hand in the format `aimv2 probe` writes (probe.json + one
    safetensors file per head), and the arrays in it."""
    rng = np.random.default_rng(0)
    arrays = {
        "linear": {
            "weight": rng.standard_normal((DIMS, CLASSES)),
            "bias": rng.standard_normal(CLASSES),
        },
        "knn": {
            "features": rng.standard_normal((12, DIMS)),
            "labels": rng.integers(0, CLASSES, 12).astype(np.int32),
        },
        "attentive": {
            "cls_token": rng.standard_normal((1, 1, DIMS)),
            "k.weight": rng.standard_normal((DIMS, DIMS)),
            "v.weight": rng.standard_normal((DIMS, DIMS)),
            "linear.weight": rng.standard_normal((CLASSES, DIMS)),
            "linear.bias": rng.standard_normal(CLASSES),
        },
    }
    for name, head in arrays.items():
        mx.save_safetensors(
            str(tmp_path / f"{name}.safetensors"),
            {
                k: mx.array(v.astype(np.float32) if v.dtype.kind == "f" else v)
                for k, v in head.items()
            },
        )
    record = {
        "format": "aimv2-mlx-probe",
        "classes": ["a", "b", "c"],
        "model": {"name": "tiny", "load": None},
        "features": {"kind": "tokens", "blocks": None},
        "heads": {
            "linear": {
                "file": "linear.safetensors",
                "C": 10.0,
                "normalize": True,
                "val_accuracy": 0.5,
            },
            "knn": {"file": "knn.safetensors", "k": 4, "temperature": 0.07, "val_accuracy": 0.75},
            "attentive": {
                "file": "attentive.safetensors",
                "num_heads": HEADS,
                "val_accuracy": 0.25,
            },
        },
    }
    (tmp_path / "probe.json").write_text(json.dumps(record, indent=2))
    return tmp_path, arrays


def test_a_probe_folder_in_todays_format_loads_and_every_head_matches_numpy(saved_folder):
    folder, arrays = saved_folder
    loaded = load_probe(folder)
    tokens = np.random.default_rng(1).standard_normal((6, TOKENS, DIMS)).astype(np.float32)
    pooled = tokens.mean(1).astype(np.float64)
    linear = arrays["linear"]
    unit = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    expected = {
        "linear": _softmax(unit @ linear["weight"] + linear["bias"]),
        "knn": _knn_votes(arrays["knn"]["features"], arrays["knn"]["labels"], pooled, 4, 0.07),
        "attentive": _softmax(_attention_pool(arrays["attentive"], tokens.astype(np.float64))),
    }
    assert set(loaded.heads) == set(expected)
    for name, reference in expected.items():
        probabilities = loaded.probabilities(tokens, name)
        assert probabilities.shape == (6, CLASSES)
        np.testing.assert_allclose(probabilities, reference, atol=2e-4, err_msg=name)
    np.testing.assert_allclose(
        loaded.probabilities(tokens.mean(1), "linear"), expected["linear"], atol=2e-4
    )


def test_a_probe_json_naming_an_unknown_head_is_refused_with_its_name(saved_folder):
    folder, _ = saved_folder
    record = json.loads((folder / "probe.json").read_text())
    record["heads"]["forest"] = {"file": "linear.safetensors"}
    (folder / "probe.json").write_text(json.dumps(record))
    with pytest.raises(UnusableFileError, match=r"probe\.json.*forest"):
        load_probe(folder)


@dataclass
class CentroidHead:
    """A head the library does not know: the nearest class mean of pooled features."""

    centroids: np.ndarray
    name: ClassVar[str] = "centroid"
    pooled: ClassVar[bool] = True

    @classmethod
    def fit(cls, train, val, num_classes, settings, progress=None):
        x, y = train
        head = cls(np.stack([x[y == c].mean(0) for c in range(num_classes)]))
        accuracy = float((head.probabilities(val[0]).argmax(1) == val[1]).mean())
        if progress:
            progress(1, 1)
        return head, {"val_accuracy_by_setting": {"-": accuracy}}

    def probabilities(self, features):
        distances = ((features[:, None, :] - self.centroids[None]) ** 2).sum(-1)
        return _softmax(-distances)

    def to_arrays(self):
        return {"centroids": self.centroids}, {"classes": len(self.centroids)}

    @classmethod
    def from_arrays(cls, arrays, settings, num_classes):
        assert settings["classes"] == num_classes
        return cls(arrays["centroids"])


def test_a_head_registered_once_is_trained_saved_scored_and_loaded(tmp_path, monkeypatch):
    monkeypatch.setitem(HEAD_TYPES, "centroid", CentroidHead)
    rng = np.random.default_rng(0)
    for name, colour in {"red": (200, 30, 30), "green": (30, 180, 40)}.items():
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(6):
            pixels = np.clip(np.array(colour) + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(
                np.uint8
            )
            Image.fromarray(pixels).save(tmp_path / "data" / name / f"{i}.png")
    mx.random.seed(0)
    model = aimv2_mlx.build(tiny_config())
    settings = ProbeSettings(
        heads=("centroid", "linear"),
        val_fraction=0.25,
        test_fraction=0.25,
        cache_dir=tmp_path / "cache",
        attentive=AttentiveSettings(epochs=1),
    )
    report = probe(
        tmp_path / "data", tmp_path / "out", model, settings=settings, log=lambda message: None
    )
    assert set(report["heads"]) == {"centroid", "linear"}
    assert (tmp_path / "out" / "centroid.safetensors").is_file()
    assert (tmp_path / "out" / "confusion-centroid.png").is_file()
    loaded = load_probe(tmp_path / "out")
    assert (
        loaded.record["heads"]["centroid"]["val_accuracy"]
        == report["heads"]["centroid"]["val_accuracy"]
    )
    test = json.loads((tmp_path / "out" / "split.json").read_text())["test"]
    features = extract([tmp_path / "data" / row["path"] for row in test], model)
    labels = np.array([loaded.classes.index(row["label"]) for row in test])
    accuracy = (loaded.probabilities(features.values, "centroid").argmax(1) == labels).mean()
    assert accuracy == pytest.approx(report["heads"]["centroid"]["top1"])
