"""`probe()`: labelled folders → frozen features → linear / kNN / attentive heads → metrics.

Everything a run decides is written next to its metrics: `split.json` (which image went where),
`failures.jsonl`, `metrics.json`, one confusion-matrix PNG per head, and the heads themselves
(`probe.json` + one safetensors file per head, see `saved.py`), so `aimv2 classify --probe DIR`
needs nothing else.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..embed import model_identity
from ..errors import SettingError
from ..folders import atomic_write, write_json
from ..layers import block_indices
from .data import LabelledImages, ProbeDataError, load_labelled, save_split, stratified_split
from .features import features_for
from .head import ProbeHead, head_input
from .metrics import classification_metrics, save_confusion_png
from .registry import HEAD_TYPES
from .saved import save_heads, validation_accuracy
from .settings import ProbeSettings

Progress = Callable[[str, int, int], None]


@dataclasses.dataclass
class SplitFeatures:
    values: np.ndarray  # (N, D) pooled or (N, T, D) tokens, of the images that decoded
    labels: np.ndarray  # (N,) class indices
    names: list[str]


def probe(
    train: str | os.PathLike,
    output: str | os.PathLike,
    model,
    *,
    val: str | os.PathLike | None = None,
    test: str | os.PathLike | None = None,
    settings: ProbeSettings | None = None,
    log: Callable[[str], None] | None = None,
    progress: Progress | None = None,
) -> dict:
    """Train the requested heads on `train` (ImageFolder root or label file) and evaluate them.

    Returns the metrics (also written to `output/metrics.json`). `progress(stage, done, total)`
    follows feature extraction ("features: train", …) and head fitting ("linear head", …).
    """
    settings = _checked(settings or ProbeSettings(), model)
    log = log or (lambda message: print(message, file=sys.stderr))
    splits, missing = _splits(train, val, test, settings, log)
    classes = _classes(splits)
    output = Path(output).expanduser()  # made only once the data is known to be usable
    output.mkdir(parents=True, exist_ok=True)
    save_split(
        output / "split.json",
        splits,
        {
            "seed": settings.seed,
            "val_fraction": settings.val_fraction,
            "test_fraction": None if test else settings.test_fraction,
        },
    )
    kind = "mean" if all(HEAD_TYPES[name].pooled for name in settings.heads) else "tokens"
    started = time.perf_counter()
    features, failures = _features(splits, classes, model, kind, settings, log, progress)
    report = {
        "classes": classes,
        "model": model_identity(model),
        "feature_seconds": time.perf_counter() - started,
        "counts": {name: len(split.labels) for name, split in features.items()},
        "failed": len(failures),
        "heads": {},
    }
    _record_failures(output, failures, missing, features, log)
    heads = {}
    for name in settings.heads:
        heads[name], report["heads"][name] = _fit_and_test(
            HEAD_TYPES[name], features, classes, settings, _stage(progress, f"{name} head")
        )
        save_confusion_png(
            report["heads"][name]["confusion_matrix"],
            classes,
            output / f"confusion-{name}.png",
            f"{name} probe: top-1 {report['heads'][name]['top1']:.3f}",
        )
    accuracy = {name: metrics["val_accuracy"] for name, metrics in report["heads"].items()}
    save_heads(output, heads, accuracy, classes, model, kind, settings.blocks)
    write_json(output / "metrics.json", report)
    return report


def _checked(settings: ProbeSettings, model) -> ProbeSettings:
    """Settings refused before any work, with the attentive head's count of attention heads
    defaulting to the encoder's."""
    unknown = set(settings.heads) - set(HEAD_TYPES)
    if unknown or not settings.heads:
        raise SettingError(
            f"unknown head(s) {', '.join(sorted(unknown)) or '(none)'}: use {', '.join(HEAD_TYPES)}"
        )
    vision = model.config.vision
    if settings.blocks:
        block_indices(settings.blocks, vision.num_hidden_layers)
    if settings.attentive.num_heads is None:
        attentive = dataclasses.replace(settings.attentive, num_heads=vision.num_attention_heads)
        settings = dataclasses.replace(settings, attentive=attentive)
    return settings


def _stage(progress: Progress | None, stage: str):
    """`progress` with its stage name bound: the (done, total) callback a step takes."""
    return (lambda done, total: progress(stage, done, total)) if progress else None


def _splits(
    train, val, test, settings: ProbeSettings, log
) -> tuple[dict[str, LabelledImages], list[dict]]:
    """The train/val/test sets, and the label-file rows that named missing images."""
    data = load_labelled(train)
    for warning in data.warnings:
        log(f"warning: {warning}")
    missing = list(data.missing)
    if test is not None:
        test_data = load_labelled(test)
    else:
        keep, held = stratified_split(data.labels, settings.test_fraction, settings.seed)
        data, test_data = data.subset(keep), data.subset(held)
    if val is not None:
        val_data = load_labelled(val)
    else:
        keep, held = stratified_split(data.labels, settings.val_fraction, settings.seed + 1)
        data, val_data = data.subset(keep), data.subset(held)
    return {"train": data, "val": val_data, "test": test_data}, missing


def _classes(splits: dict[str, LabelledImages]) -> list[str]:
    """The training set's classes, once every split is known to be usable with them."""
    classes = sorted(set(splits["train"].labels))
    for name in ("val", "test"):
        strangers = sorted(set(splits[name].labels) - set(classes))
        if strangers:
            raise ProbeDataError(
                f"{name} set has class {strangers[0]!r}, which the training set lacks"
            )
    empty = next((name for name, data in splits.items() if not len(data.labels)), None)
    if empty:
        fix = (
            "smaller --val-fraction and --test-fraction"
            if empty == "train"
            else f"a larger --{empty}-fraction or a --{empty}-dir"
        )
        raise ProbeDataError(
            f"the {empty} set is empty (of {sum(len(d.labels) for d in splits.values())} images): "
            f"give more images per class, {fix}"
        )
    return classes


def _features(
    splits: dict[str, LabelledImages],
    classes: list[str],
    model,
    kind: str,
    settings: ProbeSettings,
    log,
    progress: Progress | None,
) -> tuple[dict[str, SplitFeatures], list[dict]]:
    """Each split's features (cached) and labels, and the images that failed to decode."""
    features, failures = {}, []
    for name, data in splits.items():
        found = features_for(
            data.paths,
            model,
            kind,
            settings.blocks,
            settings.cache_dir,
            settings.batch_size,
            settings.workers,
            progress=_stage(progress, f"features: {name}"),
        )
        failures += [{**f, "split": name} for f in found.failures]
        labels = np.array([classes.index(data.labels[i]) for i in found.kept], dtype=np.int64)
        features[name] = SplitFeatures(found.values, labels, [data.names[i] for i in found.kept])
        log(
            f"{name}: {len(labels)} images"
            + (" (cached features)" if found.from_cache else "")
            + (f", {len(found.failures)} failed to decode" if found.failures else "")
        )
    return features, failures


def _fit_and_test(
    head_type: type[ProbeHead],
    features: dict[str, SplitFeatures],
    classes: list[str],
    settings: ProbeSettings,
    progress,
) -> tuple[ProbeHead, dict]:
    """One head fitted on train (chosen on val) and its metrics on test."""
    started = time.perf_counter()
    train, val, test = (
        (head_input(head_type, features[name].values), features[name].labels)
        for name in ("train", "val", "test")
    )
    head, chosen = head_type.fit(train, val, len(classes), settings, progress)
    metrics = classification_metrics(head.probabilities(test[0]), test[1], classes)
    metrics.update(
        chosen=chosen,
        val_accuracy=validation_accuracy(chosen),
        seconds=time.perf_counter() - started,
    )
    return head, metrics


def _record_failures(
    output: Path,
    failures: list[dict],
    missing: list[dict],
    features: dict[str, SplitFeatures],
    log,
) -> None:
    """List the images that failed to decode (and label rows naming missing files) in
    `failures.jsonl` and the log; a split left with no image is refused."""
    listed = failures + [{**row, "split": "labels"} for row in missing]
    lines = "".join(json.dumps(failure) + "\n" for failure in listed)
    atomic_write(output / "failures.jsonl", lambda tmp: tmp.write_text(lines))
    for failure in failures:
        log(f"skipped {failure['path']}: {failure['reason']}")
    empty = next((name for name, split in features.items() if len(split.labels) == 0), None)
    if empty:
        raise ProbeDataError(f"no usable images left in the {empty} set")
