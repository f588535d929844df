"""Read apple/ml-l3m training checkpoints without torch and without running their code.

ml-l3m (src/l3m/helpers/checkpoint.py `DistributedCheckpointUtils`) saves a PyTorch Distributed
Checkpoint folder and consolidates it into one `torch.save` file (`dcp_checkpoint_to_torch`:
`dcp_to_torch_save`, then the keys of `other.pth` added): a dict with `"model"` (the state
dict), `"optimizer"` (`get_state_dict`'s: per-parameter state keyed by parameter name) and
whatever else the run kept (`cfg`, `iteration`, `lr_scheduler`, `loss_scaler`, …), which may be
objects of any class.

Such a file is read by the restricted unpickler of `torch_pickle`, with one difference: a global
it does not allow becomes an inert stand-in instead of stopping the read. Nothing is imported or
called for it; the stand-in swallows its arguments and state. The model part must still hold
tensors only (a stand-in there is refused, naming the global), so what other entries hold is
refused without costing the weights.

A DCP folder itself (`.metadata` + `*.distcp`) is not read: its `.metadata` is a pickle of
torch.distributed classes and each item a torch.save stream at an offset in a shard, a private
layout that changes between torch versions (item serialisation, storage transforms). It is
recognised and refused with the command that consolidates it.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .torch_pickle import (
    Refused,
    RestrictedUnpickler,
    TorchTensor,
    check_storage_use,
    data_pickle,
    pickle_errors,
)
from .weights import CheckpointError

CONSOLIDATE = (
    "python -m torch.distributed.checkpoint.format_utils dcp_to_torch_save {folder} {folder}.pth"
)


class Opaque:
    """What a refused global's object becomes: it keeps the global's name and nothing else."""

    refused = "?"

    def __init__(self, *_args, **_kwargs):
        pass

    def __setstate__(self, _state):
        pass

    def __setitem__(self, _key, _value):
        pass

    def append(self, _value):
        pass

    def extend(self, _values):
        pass


# A training checkpoint's other entries name a few dozen classes; a pickle naming thousands is
# built to make the reader allocate one stand-in class each.
_MAX_REFUSED = 1000


class _TolerantUnpickler(RestrictedUnpickler):
    """The restricted unpickler, with each refused global an `Opaque` class of that name."""

    def __init__(self, *args):
        super().__init__(*args)
        self.stand_ins: dict[str, type] = {}

    @property
    def refused(self) -> list[str]:
        return list(self.stand_ins)

    def find_class(self, module: str, name: str):
        try:
            return super().find_class(module, name)
        except CheckpointError:
            refused = f"{module}.{name}"
            if refused not in self.stand_ins:
                if len(self.stand_ins) >= _MAX_REFUSED:
                    raise Refused(
                        f"the pickle asks for more than {_MAX_REFUSED} globals "
                        "that are not needed to rebuild tensors"
                    ) from None
                self.stand_ins[refused] = type(
                    f"Opaque[{refused}]", (Opaque,), {"refused": refused}
                )
            return self.stand_ins[refused]


@dataclass
class TrainingCheckpoint:
    """The parts of a consolidated ml-l3m file this project uses."""

    path: Path
    model: dict[str, TorchTensor]
    # {"state": {name: {"exp_avg", "exp_avg_sq", "step"}}, "param_groups": [...]}
    optimizer: dict | None
    refused: list[str] = field(default_factory=list)  # globals of other entries, not executed
    entries: list[str] = field(default_factory=list)  # the file's top-level keys


def is_dcp_folder(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file() and any(path.glob("*.distcp"))


def refuse_dcp_folder(path: Path) -> None:
    """A DCP folder is refused with the one command that makes it readable."""
    raise CheckpointError(
        f"{path}: a PyTorch Distributed Checkpoint folder, which is read only once consolidated "
        f"into one file (its metadata is a pickle of torch.distributed classes): run "
        f"`{CONSOLIDATE.format(folder=str(path).rstrip('/'))}` where torch is installed, "
        "then use that file"
    )


def _unpickle(path: Path):
    with zipfile.ZipFile(path) as archive:
        name = data_pickle(archive, path)
        with archive.open(name) as handle:
            unpickler = _TolerantUnpickler(handle, archive, name[: -len("data.pkl")], path)
            return unpickler.load(), unpickler.refused


def _model_part(state, path: Path) -> dict:
    for wrapper in ("model", "state_dict"):  # training checkpoints nest the weights
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            return state[wrapper]
    if isinstance(state, Opaque):
        raise Refused(
            f"the pickle asks for global {state.refused}, which is not needed to rebuild tensors "
            "(nothing was executed)"
        )
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path}: the pickle holds a {type(state).__name__}, not a state dict"
        )
    return state


def _tensors_only(part: dict, path: Path) -> dict[str, TorchTensor]:
    for key, value in part.items():
        if isinstance(value, Opaque):
            raise Refused(
                f"entry {key!r} asks for global {value.refused}, which is not needed to rebuild "
                "tensors (nothing was executed)"
            )
        if not isinstance(value, TorchTensor):
            raise CheckpointError(
                f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor"
            )
    return {str(key): value for key, value in part.items()}


def _optimizer_part(state) -> dict | None:
    """The optimizer entry when it has the shape `get_state_dict` gives it, else None."""
    optimizer = state.get("optimizer") if isinstance(state, dict) else None
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)):
        return None
    return optimizer


def open_training_checkpoint(path: str | os.PathLike) -> TrainingCheckpoint:
    """A torch-saved checkpoint (a state dict, or a training file with `"model"`) as lazy tensors.

    Globals outside the model part are refused without being called and listed in `refused`.
    """
    path = Path(path).expanduser()
    if is_dcp_folder(path):
        refuse_dcp_folder(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path}: not a PyTorch zip checkpoint (legacy or corrupt pickle files are refused)"
        )
    with pickle_errors(path):
        state, refused = _unpickle(path)
        model = _tensors_only(_model_part(state, path), path)
        optimizer = _optimizer_part(state)
        moments = [
            value
            for entry in (optimizer or {}).get("state", {}).values()
            if isinstance(entry, dict)
            for value in entry.values()
            if isinstance(value, TorchTensor)
        ]
        check_storage_use([*model.values(), *moments])
    entries = [str(key) for key in state] if isinstance(state, dict) and model is not state else []
    return TrainingCheckpoint(path, model, optimizer, refused, entries)
