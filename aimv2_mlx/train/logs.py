"""Training logs: one JSON line per logged step, and PNG plots (matplotlib, the `plot` extra)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..folders import naming_full_disk


def append(path: Path, record: dict) -> None:
    with naming_full_disk(path), open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def read(path: Path) -> list[dict]:
    """The records; a torn last line (a run killed mid-write) is dropped, any other bad line refused."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not a log record")
        records.append(record)
    return records


def truncate(path: Path, step: int) -> None:
    """Drop records after `step` (a resumed run re-logs them), atomically."""
    if not path.is_file():
        return
    keep = [r for r in read(path) if r.get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    with naming_full_disk(path):
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    os.replace(tmp, path)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_losses(log: Path, out: Path) -> Path | None:
    """Loss curves (total, pixel, text) against step; None when matplotlib is missing."""
    plt, records = _pyplot(), read(log)
    if plt is None or not records:
        return None
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("loss", "loss_pixel", "loss_text"):
        ax.plot(steps, [r[key] for r in records], label=key)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_reconstructions(real: np.ndarray, predicted: np.ndarray, captions: list[str], out: Path) -> Path | None:
    """Rows of real | predicted images (uint8 (B, H, W, 3)) titled with greedy captions."""
    plt = _pyplot()
    if plt is None:
        return None
    rows = len(real)
    fig, axes = plt.subplots(rows, 2, figsize=(5, 2.4 * rows), squeeze=False)
    for i in range(rows):
        for j, image in enumerate((real[i], predicted[i])):
            axes[i, j].imshow(image)
            axes[i, j].axis("off")
        axes[i, 0].set_title("real", fontsize=7)
        axes[i, 1].set_title(captions[i][:60], fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
