"""A saved probe: `probe.json` + one safetensors file per head, written by `probe()` and read by
`load_probe` and `ProbeClassifier` (`aimv2 classify --probe DIR`).

`probe.json` records the classes, how to load the encoder, which features the heads take, and
per head its file, the settings that rebuild it and its validation accuracy.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..embed import model_identity
from ..errors import SettingError, UnusableFileError
from ..folders import naming_full_disk
from ..images import ImageError
from ..model import load
from .features import extract
from .head import ProbeHead, head_input
from .registry import HEAD_TYPES

FORMAT = "aimv2-mlx-probe"


def validation_accuracy(chosen: dict) -> float:
    """A head's validation accuracy at its chosen setting: the best of its sweep."""
    sweep = next(value for key, value in chosen.items() if key.startswith("val_accuracy_by_"))
    return max(sweep.values())


def best_head(record: dict) -> str:
    """The saved head with the best validation accuracy (ties and older probes without scores: the
    registry's order, the cheaper head first)."""
    heads, order = record["heads"], list(HEAD_TYPES)
    return max(
        (name for name in order if name in heads),
        key=lambda name: (heads[name].get("val_accuracy", -1.0), -order.index(name)),
    )


def save_heads(
    output: Path,
    heads: dict[str, ProbeHead],
    val_accuracy: dict[str, float],
    classes: list[str],
    model,
    kind: str,
    blocks: tuple[int, ...] | None,
) -> None:
    """Each head's arrays as `<name>.safetensors`, then `probe.json`, which names them."""
    record = {
        "format": FORMAT,
        "classes": classes,
        "model": {**model_identity(model), "load": _load_argument(model)},
        "features": {"kind": kind, "blocks": list(blocks) if blocks else None},
        "heads": {},
    }
    for name, head in heads.items():
        arrays, settings = head.to_arrays()
        record["heads"][name] = {
            "file": f"{name}.safetensors",
            **settings,
            "val_accuracy": val_accuracy[name],
        }
        with naming_full_disk(output / record["heads"][name]["file"]):
            mx.save_safetensors(
                str(output / record["heads"][name]["file"]),
                {k: mx.array(np.ascontiguousarray(v)) for k, v in arrays.items()},
            )
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
    for name in (set(HEAD_TYPES) & set(previous)) - set(kept):
        for stale in (output / f"{name}.safetensors", output / f"confusion-{name}.png"):
            stale.unlink(missing_ok=True)


def _load_argument(model) -> dict | None:
    """What `aimv2_mlx.load()` needs to rebuild the probe's encoder (None: built in memory)."""
    location = model.location
    if location is None:
        return None
    if location.origin.startswith("hf://"):
        return {"path_or_id": location.origin.removeprefix("hf://"), "revision": location.revision}
    return {
        "path_or_id": "bundled" if location.origin == "bundled" else str(location.path.resolve()),
        "revision": None,
    }


@dataclass
class LoadedProbe:
    classes: list[str]
    heads: dict[str, ProbeHead]
    record: dict

    def probabilities(self, features: np.ndarray, name: str) -> np.ndarray:
        """Class probabilities (N, C) from pooled or token features (tokens are pooled for a
        pooled head)."""
        head = self.heads[name]
        return head.probabilities(head_input(head, features))


def load_probe(folder: str | os.PathLike) -> LoadedProbe:
    folder = Path(folder).expanduser()
    try:
        record = json.loads((folder / "probe.json").read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{folder}: no probe.json (not a folder written by `aimv2 probe`)"
        ) from None
    except (OSError, ValueError) as exc:
        raise UnusableFileError(f"{folder / 'probe.json'}: unreadable ({exc})") from None
    try:
        return _probe_from_record(folder, record)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as exc:
        raise UnusableFileError(
            f"{folder / 'probe.json'}: not a probe record `aimv2 probe` wrote "
            f"({type(exc).__name__}: {exc})"
        ) from None


def _probe_from_record(folder: Path, record: dict) -> LoadedProbe:
    if (
        not isinstance(record["classes"], list)
        or "load" not in record["model"]
        or "blocks" not in record["features"]
    ):
        raise ValueError("classes, model.load or features.blocks missing")
    _fill_val_accuracy(record, folder / "metrics.json")
    heads = {}
    for name, info in record["heads"].items():
        if Path(info["file"]).name != info["file"]:
            raise ValueError(f"head file {info['file']!r} is outside the probe folder")
        arrays = {k: np.array(v) for k, v in mx.load(str(folder / info["file"])).items()}
        heads[name] = HEAD_TYPES[name].from_arrays(arrays, info, len(record["classes"]))
    return LoadedProbe(record["classes"], heads, record)


def _fill_val_accuracy(record: dict, metrics_path: Path) -> None:
    """Probes saved before probe.json recorded validation accuracy: take it from metrics.json."""
    if (
        all("val_accuracy" in info for info in record["heads"].values())
        or not metrics_path.is_file()
    ):
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
            raise SettingError(
                f"{probe_dir}: has no {self.head!r} head (it has {', '.join(self.probe.heads)})"
            )
        if model is None:
            argument = self.probe.record["model"]["load"]
            if not argument:
                raise SettingError(
                    f"{probe_dir}: the probe's encoder was built in memory, not loaded; "
                    "pass the model"
                )
            model = load(argument["path_or_id"], revision=argument["revision"])
        self.model = model
        self.labels = self.probe.classes
        blocks = self.probe.record["features"]["blocks"]
        self.blocks = tuple(blocks) if blocks else None

    def __call__(self, images, batch_size: int = 8) -> np.ndarray:
        images = list(images)
        kind = "mean" if self.probe.heads[self.head].pooled else "tokens"
        features = extract(images, self.model, kind, self.blocks, batch_size)
        if features.failures:
            failure = features.failures[0]
            raise ImageError(f"{failure['path']}: {failure['reason']}")
        return self.probe.probabilities(features.values, self.head)
