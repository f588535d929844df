"""Training logs: one JSON line per logged step, and PNG plots (loss curves, reconstructions)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np

from ..errors import UnusableFileError
from ..folders import atomic_write, naming_full_disk


def append(path: Path, record: dict) -> None:
    with naming_full_disk(path), open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def read(path: Path) -> list[dict]:
    """The records; a torn last line (a run killed mid-write) is dropped, any other bad line
    refused.
    """
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
            raise UnusableFileError(f"{path}:{number}: not a log record")
        records.append(record)
    return records


def truncate(path: Path, step: int) -> None:
    """Drop records after `step` (a resumed run re-logs them), atomically."""
    if not path.is_file():
        return
    keep = [r for r in read(path) if r.get("step", 0) <= step]
    atomic_write(path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in keep)))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


LOSS_LABELS = {
    "loss": "total (weighted sum)",
    "loss_pixel": "pixel (MSE on normalised patches)",
    "loss_text": "text (cross-entropy)",
}


def loss_figure(records: list[dict], title: str, labels: dict[str, str] = LOSS_LABELS):
    """Loss curves (`labels`: record key -> legend; total, pixel, text) against step, log scale."""
    plt = _pyplot()
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in labels.items():
        ax.plot(steps, [r[key] for r in records], label=label)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (log scale)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_losses(
    log: Path, out: Path, what: str = "pre-training", labels: dict[str, str] = LOSS_LABELS
) -> Path | None:
    """`loss_figure` of a run's log as a PNG; None while nothing is logged."""
    records = read(log)
    if not records:
        return None
    fig = loss_figure(records, f"{what} loss: {out.parent.resolve().name}", labels)
    fig.savefig(out, dpi=100)
    _pyplot().close(fig)
    return out


CAPTION_WIDTH = 38  # characters per line of the caption column


def reconstruction_figure(
    real: np.ndarray, predicted: np.ndarray, truth: list[str], generated: list[str]
):
    """One row per image: real | predicted (uint8 (B, H, W, 3)) | its real and generated
    captions.
    """
    plt = _pyplot()
    rows = len(real)
    fig, axes = plt.subplots(
        rows,
        3,
        figsize=(7.5, 2.0 * rows + 0.3),
        squeeze=False,
        gridspec_kw={"width_ratios": [1, 1, 1.9]},
    )
    for i in range(rows):
        for j, image in enumerate((real[i], predicted[i])):
            axes[i, j].imshow(image)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
        axes[i, 2].axis("off")
        text = (
            f"real caption:\n{textwrap.fill(truth[i] or '(none)', CAPTION_WIDTH)}\n\n"
            f"generated:\n{textwrap.fill(generated[i] or '(no text decoder)', CAPTION_WIDTH)}"
        )
        axes[i, 2].text(
            0.0,
            0.5,
            text,
            fontsize=7,
            va="center",
            ha="left",
            family="monospace",
            transform=axes[i, 2].transAxes,
        )
    axes[0, 0].set_title("real", fontsize=9)
    axes[0, 1].set_title("predicted", fontsize=9)
    axes[0, 2].set_title("captions", fontsize=9, loc="left")
    fig.tight_layout()
    return fig


def plot_reconstructions(
    real: np.ndarray, predicted: np.ndarray, truth: list[str], generated: list[str], out: Path
) -> Path:
    """`reconstruction_figure` as a PNG."""
    fig = reconstruction_figure(real, predicted, truth, generated)
    fig.savefig(out, dpi=100)
    _pyplot().close(fig)
    return out
