"""torch.save-style zip checkpoints written without torch, and the pickle that must never run."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path


class Evil:
    """Unpickling this runs `touch MARKER`: a reader that executes pickles leaves the marker."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def torch_zip_with(payload, path: Path) -> Path:
    """A file laid out like torch.save's zip, whose data.pkl is the given object's pickle."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(payload, protocol=2))
        archive.writestr("archive/version", "3\n")
    return path


def evil_checkpoint(path: Path, marker: Path) -> Path:
    """A torch checkpoint whose one tensor is an `Evil` pickle that would create `marker`."""
    return torch_zip_with({"weight": Evil(marker)}, path)
