"""Classification metrics for probes: top-1/top-5, balanced accuracy, per-class precision and
recall, a confusion matrix, and its PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def classification_metrics(scores: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    """Metrics of (N, C) class scores against integer labels."""
    num_classes = len(classes)
    predicted = scores.argmax(1)
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    support = confusion.sum(1)
    predicted_count = confusion.sum(0)
    correct = np.diag(confusion)
    recall = np.divide(correct, support, out=np.zeros(num_classes), where=support > 0)
    precision = np.divide(
        correct, predicted_count, out=np.zeros(num_classes), where=predicted_count > 0
    )
    result = {
        "count": len(labels),
        "top1": float((predicted == labels).mean()) if len(labels) else 0.0,
        "balanced_accuracy": float(recall[support > 0].mean()) if support.any() else 0.0,
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "confusion_matrix": confusion.tolist(),
    }
    if num_classes >= 5:
        top5 = np.argsort(-scores, axis=1)[:, :5]
        result["top5"] = float((top5 == labels[:, None]).any(1).mean()) if len(labels) else 0.0
    return result


def save_confusion_png(
    confusion: list[list[int]], classes: list[str], path: Path, title: str
) -> Path:
    """Write the confusion matrix as a PNG (rows: true class, normalised; cells: counts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(confusion, dtype=np.float64)
    rows = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    size = max(4.0, 0.45 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=90)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if len(classes) <= 30:
        for i in range(len(classes)):
            for j in range(len(classes)):
                if matrix[i, j]:
                    ax.text(
                        j,
                        i,
                        int(matrix[i, j]),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if rows[i, j] > 0.5 else "black",
                    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
