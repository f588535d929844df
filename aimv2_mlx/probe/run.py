"""`probe()`: labelled folders → frozen features → linear / kNN / attentive heads → metrics; and
`ProbeClassifier`, which applies a saved probe to new images.

Everything a run decides is written next to its metrics: `split.json` (which image went where),
`failures.jsonl`, `metrics.json`, one confusion-matrix PNG per head, and the heads themselves
(`probe.json` + one safetensors file per head), so `aimv2 classify --probe DIR` needs nothing else.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from ..embed import model_identity
from ..folders import naming_full_disk
from ..images import ImageError
from ..layers import block_indices
from ..model import load
from .attentive import AttentiveSettings, head_arrays, head_from_arrays, head_scores, train_attentive
from .data import LabelledImages, ProbeDataError, load_labelled, save_split, stratified_split
from .features import extract, features_for
from .knn import DEFAULT_KS, KnnHead, train_knn
from .linear import DEFAULT_C_GRID, LinearHead, train_linear
from .metrics import classification_metrics, save_confusion_png

HEADS = ("linear", "knn", "attentive")


@dataclass
class ProbeSettings:
    heads: tuple[str, ...] = ("linear", "knn")
    val_fraction: float = 0.1
    test_fraction: float = 0.2  # only when no test set is given
    seed: int = 0
    normalize: bool = True  # L2-normalise pooled features for the linear head
    blocks: tuple[int, ...] | None = None  # None: post-trunk-normed tokens; else mean of these blocks
    c_grid: tuple[float, ...] = DEFAULT_C_GRID
    ks: tuple[int, ...] = DEFAULT_KS
    attentive: AttentiveSettings = field(default_factory=AttentiveSettings)
    batch_size: int = 8
    workers: int = 0
    cache_dir: str | os.PathLike | None = None

    def __post_init__(self):
        """Paths as given by a person (str, `~`) and blocks as any sequence, in one canonical form."""
        if self.cache_dir is not None:
            self.cache_dir = Path(self.cache_dir).expanduser()
        if self.blocks is not None:
            self.blocks = tuple(self.blocks)


def probe(train: str | os.PathLike, output: str | os.PathLike, model, *, val: str | os.PathLike | None = None,
          test: str | os.PathLike | None = None, settings: ProbeSettings | None = None,
          log: Callable[[str], None] | None = None,
          progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Train the requested heads on `train` (ImageFolder root or label file) and evaluate them.

    Returns the metrics (also written to `output/metrics.json`). `progress(stage, done, total)`
    follows feature extraction ("features: train", …) and head fitting ("linear head", …).
    """
    settings = settings or ProbeSettings()
    log = log or (lambda message: print(message, file=sys.stderr))
    unknown = set(settings.heads) - set(HEADS)
    if unknown or not settings.heads:
        raise ValueError(f"unknown head(s) {', '.join(sorted(unknown)) or '(none)'}: use {', '.join(HEADS)}")
    if settings.blocks:
        block_indices(settings.blocks, model.config.vision.num_hidden_layers)
    splits, missing = _splits(train, val, test, settings, log)
    classes = sorted(set(splits["train"].labels))
    for name in ("val", "test"):
        strangers = sorted(set(splits[name].labels) - set(classes))
        if strangers:
            raise ProbeDataError(f"{name} set has class {strangers[0]!r}, which the training set lacks")
    empty = next((name for name, data in splits.items() if not len(data.labels)), None)
    if empty:
        fix = ("smaller --val-fraction and --test-fraction" if empty == "train"
               else f"a larger --{empty}-fraction or a --{empty}-dir")
        raise ProbeDataError(f"the {empty} set is empty (of {sum(len(d.labels) for d in splits.values())} images): "
                             f"give more images per class, {fix}")
    output = Path(output).expanduser()  # made only once the data is known to be usable
    output.mkdir(parents=True, exist_ok=True)
    save_split(output / "split.json", splits, {"seed": settings.seed, "val_fraction": settings.val_fraction,
                                                "test_fraction": None if test else settings.test_fraction})

    kind = "tokens" if "attentive" in settings.heads else "mean"
    arrays, failures = {}, []
    started = time.perf_counter()
    for name, data in splits.items():
        features = features_for(data.paths, model, kind, settings.blocks, settings.cache_dir,
                                settings.batch_size, settings.workers, progress=_stage(progress, f"features: {name}"))
        failures += [{**f, "split": name} for f in features.failures]
        labels = np.array([classes.index(data.labels[i]) for i in features.kept], dtype=np.int64)
        arrays[name] = (features.values, labels, [data.names[i] for i in features.kept])
        log(f"{name}: {len(labels)} images" + (" (cached features)" if features.from_cache else "")
            + (f", {len(features.failures)} failed to decode" if features.failures else ""))
    feature_seconds = time.perf_counter() - started
    _write_failures(output / "failures.jsonl", failures + [{**m, "split": "labels"} for m in missing])
    for failure in failures:
        log(f"skipped {failure['path']}: {failure['reason']}")
    if any(len(arrays[name][1]) == 0 for name in arrays):
        empty = next(name for name in arrays if len(arrays[name][1]) == 0)
        raise ProbeDataError(f"no usable images left in the {empty} set")

    pooled = {name: (values.mean(axis=1) if kind == "tokens" else values, labels)
              for name, (values, labels, _) in arrays.items()}
    heads, report = {}, {"classes": classes, "model": model_identity(model), "feature_seconds": feature_seconds,
                         "counts": {name: len(arrays[name][1]) for name in arrays}, "failed": len(failures),
                         "heads": {}}
    for name in settings.heads:
        started, fitting = time.perf_counter(), _stage(progress, f"{name} head")
        if name == "linear":
            head, chosen = train_linear(pooled["train"], pooled["val"], len(classes), settings.c_grid,
                                        settings.normalize, fitting)
            scores = head.scores(pooled["test"][0])
        elif name == "knn":
            head, chosen = train_knn(pooled["train"], pooled["val"], len(classes), settings.ks, fitting)
            scores = head.scores(pooled["test"][0])
        else:
            attentive = settings.attentive
            if attentive.num_heads is None:
                attentive = AttentiveSettings(**{**asdict(attentive),
                                                 "num_heads": model.config.vision.num_attention_heads})
            head, chosen = train_attentive(arrays["train"][:2], arrays["val"][:2], len(classes), attentive,
                                           progress=fitting)
            scores = head_scores(head, arrays["test"][0])
        heads[name] = head
        metrics = classification_metrics(scores, arrays["test"][1], classes)
        metrics.update(chosen=chosen, val_accuracy=validation_accuracy(chosen),
                       seconds=time.perf_counter() - started)
        report["heads"][name] = metrics
        save_confusion_png(metrics["confusion_matrix"], classes, output / f"confusion-{name}.png",
                           f"{name} probe: top-1 {metrics['top1']:.3f}")
    _save_heads(output, heads, {name: m["val_accuracy"] for name, m in report["heads"].items()}, classes, model,
                kind, settings)
    tmp = output / "metrics.json.tmp"
    with naming_full_disk(output / "metrics.json"):
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, output / "metrics.json")
    return report


def _stage(progress, stage: str):
    """`progress` with its stage name bound: the (done, total) callback a step takes."""
    return (lambda done, total: progress(stage, done, total)) if progress else None


def _splits(train, val, test, settings: ProbeSettings, log) -> tuple[dict[str, LabelledImages], list[dict]]:
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


def _write_failures(path: Path, failures: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with naming_full_disk(path):
        tmp.write_text("".join(json.dumps(f) + "\n" for f in failures))
        os.replace(tmp, path)


def validation_accuracy(chosen: dict) -> float:
    """A head's validation accuracy at its chosen setting: the best of its sweep."""
    sweep = next(value for key, value in chosen.items() if key.startswith("val_accuracy_by_"))
    return max(sweep.values())


def best_head(record: dict) -> str:
    """The saved head with the best validation accuracy (ties and older probes without scores: the
    order linear, knn, attentive — the cheaper head first)."""
    heads = record["heads"]
    return max((name for name in HEADS if name in heads),
               key=lambda name: (heads[name].get("val_accuracy", -1.0), -HEADS.index(name)))


def _save_heads(output: Path, heads: dict, val_accuracy: dict[str, float], classes: list[str], model, kind: str,
                settings: ProbeSettings) -> None:
    record = {
        "format": "aimv2-mlx-probe",
        "classes": classes,
        "model": {**model_identity(model), "load": _load_argument(model)},
        "features": {"kind": kind, "blocks": list(settings.blocks) if settings.blocks else None},
        "heads": {},
    }
    for name, head in heads.items():
        if isinstance(head, LinearHead):
            arrays = {"weight": head.weight, "bias": head.bias}
            record["heads"][name] = {"file": "linear.safetensors", "C": head.C, "normalize": head.normalize}
        elif isinstance(head, KnnHead):
            arrays = {"features": head.features, "labels": head.labels.astype(np.int32)}
            record["heads"][name] = {"file": "knn.safetensors", "k": head.k, "temperature": head.temperature}
        else:
            arrays = head_arrays(head)
            record["heads"][name] = {"file": "attentive.safetensors", "num_heads": head.num_heads}
        record["heads"][name]["val_accuracy"] = val_accuracy[name]
        with naming_full_disk(output / record["heads"][name]["file"]):
            mx.save_safetensors(str(output / record["heads"][name]["file"]),
                                {k: mx.array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    _remove_stale_heads(output, kept=heads)
    with naming_full_disk(output / "probe.json"):
        (output / "probe.json").write_text(json.dumps(record, indent=2) + "\n")


def _remove_stale_heads(output: Path, kept) -> None:
    """Delete the files of heads that an earlier run into `output` saved (its probe.json says which)
    and this run did not, so the folder holds one run. Only our own head and confusion-matrix names
    are ever deleted, whatever that probe.json claims."""
    try:
        previous = json.loads((output / "probe.json").read_text())["heads"]
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return
    for name in (set(HEADS) & set(previous)) - set(kept):
        for stale in (output / f"{name}.safetensors", output / f"confusion-{name}.png"):
            stale.unlink(missing_ok=True)


def _load_argument(model) -> dict | None:
    """What `aimv2_mlx.load()` needs to rebuild the probe's encoder (None: built in memory)."""
    location = model.location
    if location is None:
        return None
    if location.origin.startswith("hf://"):
        return {"path_or_id": location.origin.removeprefix("hf://"), "revision": location.revision}
    return {"path_or_id": "bundled" if location.origin == "bundled" else str(location.path.resolve()),
            "revision": None}


@dataclass
class LoadedProbe:
    classes: list[str]
    heads: dict
    record: dict

    def scores(self, features: np.ndarray, name: str) -> np.ndarray:
        """Class probabilities (N, C) from pooled (linear/kNN) or token (attentive) features."""
        head = self.heads[name]
        if isinstance(head, KnnHead):
            votes = head.scores(features.mean(axis=1) if features.ndim == 3 else features)
            return votes / np.maximum(votes.sum(1, keepdims=True), 1e-30)
        logits = (head.scores(features.mean(axis=1) if features.ndim == 3 else features)
                  if isinstance(head, LinearHead) else head_scores(head, features))
        logits = logits - logits.max(1, keepdims=True)
        probs = np.exp(logits)
        return probs / probs.sum(1, keepdims=True)


def load_probe(folder: str | os.PathLike) -> LoadedProbe:
    folder = Path(folder).expanduser()
    try:
        record = json.loads((folder / "probe.json").read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder}: no probe.json (not a folder written by `aimv2 probe`)") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{folder / 'probe.json'}: unreadable ({exc})") from None
    try:
        return _probe_from_record(folder, record)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as exc:
        raise ValueError(f"{folder / 'probe.json'}: not a probe record `aimv2 probe` wrote "
                         f"({type(exc).__name__}: {exc})") from None


def _probe_from_record(folder: Path, record: dict) -> LoadedProbe:
    if not isinstance(record["classes"], list) or "load" not in record["model"] or "blocks" not in record["features"]:
        raise ValueError("classes, model.load or features.blocks missing")
    _fill_val_accuracy(record, folder / "metrics.json")
    heads = {}
    for name, info in record["heads"].items():
        if Path(info["file"]).name != info["file"]:
            raise ValueError(f"head file {info['file']!r} is outside the probe folder")
        arrays = {k: np.array(v) for k, v in mx.load(str(folder / info["file"])).items()}
        if name == "linear":
            heads[name] = LinearHead(arrays["weight"], arrays["bias"], info["C"], info["normalize"])
        elif name == "knn":
            heads[name] = KnnHead(arrays["features"], arrays["labels"], len(record["classes"]), info["k"],
                                  info["temperature"])
        else:
            heads[name] = head_from_arrays(arrays, info["num_heads"])
    return LoadedProbe(record["classes"], heads, record)


def _fill_val_accuracy(record: dict, metrics_path: Path) -> None:
    """Probes saved before probe.json recorded validation accuracy: take it from metrics.json."""
    if all("val_accuracy" in info for info in record["heads"].values()) or not metrics_path.is_file():
        return
    metrics = json.loads(metrics_path.read_text()).get("heads", {})
    for name, info in record["heads"].items():
        if "val_accuracy" not in info and "chosen" in metrics.get(name, {}):
            info["val_accuracy"] = validation_accuracy(metrics[name]["chosen"])


class ProbeClassifier:
    """A saved probe and its encoder; call it on images (paths or PIL) for class probabilities.

    The encoder is the one the probe records (`probe.json`) unless `model` is given; the head is
    the one with the best validation accuracy unless `head` names one.
    """

    def __init__(self, probe_dir: str | os.PathLike, model=None, head: str | None = None):
        self.probe = load_probe(probe_dir)
        self.head = head or best_head(self.probe.record)
        if self.head not in self.probe.heads:
            raise ValueError(f"{probe_dir}: has no {self.head!r} head (it has {', '.join(self.probe.heads)})")
        if model is None:
            argument = self.probe.record["model"]["load"]
            if not argument:
                raise ValueError(f"{probe_dir}: the probe's encoder was built in memory, not loaded; pass the model")
            model = load(argument["path_or_id"], revision=argument["revision"])
        self.model = model
        self.labels = self.probe.classes
        blocks = self.probe.record["features"]["blocks"]
        self.blocks = tuple(blocks) if blocks else None

    def __call__(self, images, batch_size: int = 8) -> np.ndarray:
        images = list(images)
        kind = "tokens" if self.head == "attentive" else "mean"
        features = extract(images, self.model, kind, self.blocks, batch_size)
        if features.failures:
            failure = features.failures[0]
            raise ImageError(f"{failure['path']}: {failure['reason']}")
        return self.probe.scores(features.values, self.head)
