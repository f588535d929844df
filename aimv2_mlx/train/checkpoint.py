"""Training checkpoints, written atomically: a folder built under a temporary name and renamed
into place, then a `latest` pointer replaced atomically. A checkpoint holds the encoder (an MLX
model folder `aimv2 embed` can load), the decoder, the optimizer state (moments, step, lr), and
`state.json` (step, samples seen, seed, and the size of every file, written last). All training
randomness is drawn from (seed, step) or (seed, epoch, sample) (see `batches`), so the seed and
the step are the whole RNG state.

Resume trusts no single file: it takes the newest checkpoint whose files are all there with the
sizes `state.json` recorded and whose safetensors headers match their lengths, and says so
when that is not the one `latest` names.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import UnusableFileError
from ..folders import atomic_folder, atomic_write, naming_full_disk
from ..model import save as save_encoder

LATEST = "latest"
STEP = re.compile(r"step-(\d{8})")
FILES = (
    "encoder/config.json",
    "encoder/model.safetensors",
    "decoder.safetensors",
    "optimizer.safetensors",
)


def save_checkpoint(run: Path, step: int, model, optimizer, state: dict, keep: int = 3) -> Path:
    def write(tmp: Path, final: Path) -> None:
        with naming_full_disk(final / "encoder"):
            save_encoder(model.encoder, tmp / "encoder")
        for name, tree in (
            ("decoder.safetensors", model.decoder.parameters()),
            ("optimizer.safetensors", optimizer.state),
        ):
            with naming_full_disk(final / name):
                mx.save_safetensors(str(tmp / name), dict(tree_flatten(tree)))

    return write_checkpoint(run, step, write, FILES, state, keep)


def write_checkpoint(
    run: Path, step: int, write, files: tuple[str, ...], state: dict, keep: int = 3
) -> Path:
    """`write(tmp, final)` puts `files` into the temporary folder `tmp` (naming `final` when the
    disk is full); it becomes `checkpoints/step-N` with
    `state.json` (recording every file's size), the `latest` pointer follows, older ones go."""
    folder = run / "checkpoints" / f"step-{step:08d}"
    with atomic_folder(folder) as tmp:
        write(tmp, folder)
        sizes = {name: (tmp / name).stat().st_size for name in files}
        (tmp / "state.json").write_text(
            json.dumps({"step": step, **state, "files": sizes}, indent=2) + "\n"
        )
        if folder.exists():  # a resumed run that went back past this step: the old one is replaced
            shutil.rmtree(folder)
    atomic_write(run / "checkpoints" / LATEST, lambda tmp: tmp.write_text(folder.name + "\n"))
    older = [path for s, path in checkpoints(run) if s < step]
    for old in older[keep - 1 :] if keep else []:  # the newest `keep` up to this step stay
        shutil.rmtree(old, ignore_errors=True)
    return folder


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `checkpoints/step-NNNNNNNN` folder, newest first."""
    found = []
    if (run / "checkpoints").is_dir():
        for entry in os.scandir(run / "checkpoints"):
            match = STEP.fullmatch(entry.name)
            if match and entry.is_dir():
                found.append((int(match[1]), Path(entry.path)))
    return sorted(found, reverse=True)


def problem(folder: Path, files: tuple[str, ...] = FILES) -> str | None:
    """Why `folder` cannot be resumed from (missing, truncated or tampered files), or None."""
    try:
        state = json.loads((folder / "state.json").read_text())
    except FileNotFoundError:
        return "state.json missing"
    except (OSError, ValueError):
        return "state.json unreadable"
    match = STEP.fullmatch(folder.name)
    if not isinstance(state, dict) or not match or state.get("step") != int(match[1]):
        return "state.json does not match the folder's step"
    sizes = state.get("files")
    if not isinstance(sizes, dict):
        sizes = dict.fromkeys(files)  # written before sizes were recorded: presence and headers
    for name in files:
        path = folder / name
        if not path.is_file():
            return f"{name} missing"
        if sizes.get(name) is not None and path.stat().st_size != sizes[name]:
            return f"{name} has {path.stat().st_size} bytes, {sizes[name]} were written"
        if name.endswith(".safetensors") and not _complete_safetensors(path):
            return f"{name} truncated"
    return None


def _complete_safetensors(path: Path) -> bool:
    """The header parses and its last tensor ends exactly at the end of the file."""
    try:
        with open(path, "rb") as handle:
            length = struct.unpack("<Q", handle.read(8))[0]
            if length > path.stat().st_size - 8:
                return False
            header = json.loads(handle.read(length))
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    except (OSError, ValueError, struct.error, KeyError, TypeError, IndexError):
        return False
    return 8 + length + max(ends, default=0) == path.stat().st_size


def read_pointer(run: Path) -> tuple[str | None, str | None]:
    """(the folder name `latest` names, or None; why not, or None)."""
    try:
        name = (run / "checkpoints" / LATEST).read_bytes().decode("utf-8").strip()
    except FileNotFoundError:
        return None, "the latest pointer is missing"
    except (OSError, UnicodeDecodeError):
        return None, "the latest pointer is unreadable"
    if not STEP.fullmatch(name):
        return None, "the latest pointer is garbled"
    return name, None


def resume_point(run: Path, files: tuple[str, ...] = FILES) -> tuple[Path | None, str | None]:
    """(the newest complete checkpoint, a one-line note when it is not simply the `latest` one).

    (None, note) when the run has no checkpoint folder yet; `ValueError` when it has some but
    none is complete, naming each and what is wrong with it.
    """
    named, pointer_problem = read_pointer(run)
    found = checkpoints(run)
    if not found:
        if named is not None:
            raise UnusableFileError(f"{run / 'checkpoints'}: holds no checkpoint to resume from")
        return None, f"{run}: no checkpoint yet; starting at step 0"
    skipped = []
    for _, folder in found:
        reason = problem(folder, files)
        if reason is None:
            break
        skipped.append(f"{folder.name} ({reason})")
    else:
        raise UnusableFileError(
            f"{run / 'checkpoints'}: no complete checkpoint to resume from: {'; '.join(skipped)}"
        )
    if not skipped and named == folder.name:
        return folder, None
    why = [f"skipped {', '.join(skipped)}"] if skipped else []
    why += [pointer_problem] if pointer_problem else []
    why += [f"the latest pointer names {named}"] if named not in (None, folder.name) else []
    return folder, f"resuming from {folder} ({'; '.join(why)})"


def latest_checkpoint(run: Path, files: tuple[str, ...] = FILES) -> Path | None:
    """The checkpoint `resume_point` picks, or None when the run has none."""
    if not (run / "checkpoints").is_dir():
        return None
    return resume_point(run, files)[0]


def load_checkpoint(folder: Path, model, optimizer) -> dict:
    """Weights and optimizer state into `model`/`optimizer`; returns `state.json`."""
    try:
        model.encoder.load_weights(str(folder / "encoder" / "model.safetensors"))
        model.decoder.load_weights(str(folder / "decoder.safetensors"))
        optimizer.init(model.trainable_parameters())
        optimizer.state = tree_unflatten(
            list(mx.load(str(folder / "optimizer.safetensors")).items())
        )
        mx.eval(model.parameters(), optimizer.state)
    except (ValueError, RuntimeError) as exc:
        raise UnusableFileError(f"{folder}: does not fit this run's model ({exc})") from None
    return json.loads((folder / "state.json").read_text())
