"""Plots come with the default install, and say what they show: loss.png and the sample grids."""

from __future__ import annotations

from pathlib import Path

from aimv2_mlx.train import logs

import numpy as np
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_matplotlib_is_a_dependency_of_the_default_install():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(requirement.startswith("matplotlib") for requirement in project["dependencies"])
    assert not any(
        "matplotlib" in r
        for extra in project.get("optional-dependencies", {}).values()
        for r in extra
    )


def _inside_the_figure(fig) -> bool:
    fig.canvas.draw()
    renderer, box = fig.canvas.get_renderer(), fig.bbox
    texts = [
        t
        for t in fig.findobj(lambda a: hasattr(a, "get_text") and hasattr(a, "get_window_extent"))
        if t.get_text() and t.get_visible()
    ]
    return all(
        box.x0 <= e.x0 and e.x1 <= box.x1 and box.y0 <= e.y0 and e.y1 <= box.y1
        for e in (t.get_window_extent(renderer) for t in texts)
    )


def test_loss_png_has_a_title_a_y_label_and_named_curves(tmp_path):
    log = tmp_path / "run" / "log.jsonl"
    log.parent.mkdir()
    for step in range(1, 6):
        logs.append(
            log,
            {"step": step, "loss": 3.0 / step, "loss_pixel": 1.0 / step, "loss_text": 2.0 / step},
        )
    fig = logs.loss_figure(logs.read(log), "pre-training loss: run")
    ax = fig.axes[0]
    assert (
        ax.get_title() == "pre-training loss: run"
        and "loss" in ax.get_ylabel()
        and ax.get_xlabel() == "step"
    )
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(logs.LOSS_LABELS.values())
    assert logs.plot_losses(log, log.parent / "loss.png").stat().st_size > 0


def test_sample_grid_labels_predicted_and_shows_both_captions_wrapped_inside_the_figure(tmp_path):
    rng = np.random.default_rng(0)
    real, predicted = (rng.integers(0, 255, (2, 28, 28, 3), dtype=np.uint8) for _ in range(2))
    truth = [
        "a big red circle near the top left corner beside a small blue square and a green triangle"
    ] * 2
    generated = [
        "red red circle circle top top left left square square blue blue green green triangle"
    ] * 2
    fig = logs.reconstruction_figure(real, predicted, truth, generated)
    titles = [
        ax.get_title(loc) for ax in fig.axes[:3] for loc in ("center", "left") if ax.get_title(loc)
    ]
    assert titles == ["real", "predicted", "captions"]
    shown = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert (
        all(text.startswith("real caption:\n") and "\ngenerated:\n" in text for text in shown)
        and len(shown) == 2
    )
    assert " ".join(shown[0].split()) == f"real caption: {truth[0]} generated: {generated[0]}"
    assert max(len(line) for line in shown[0].splitlines()) <= logs.CAPTION_WIDTH
    assert _inside_the_figure(fig)
    assert (
        logs.plot_reconstructions(real, predicted, truth, generated, tmp_path / "s.png")
        .stat()
        .st_size
        > 0
    )
