"""PyTorch pickles are read without torch, and a malicious pickle is refused unexecuted."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from aimv2_mlx.convert.torch_pickle import Bfloat16Array, read_torch_checkpoint
from aimv2_mlx.weights import CheckpointError


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _torch_zip_with(payload, path: Path) -> None:
    """A file laid out like torch.save's zip, whose data.pkl is the given object's pickle."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(payload, protocol=2))
        archive.writestr("archive/version", "3\n")


def test_os_system_pickle_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    _torch_zip_with({"weight": _Evil(marker)}, evil)
    with pytest.raises(CheckpointError, match=r"posix\.system|os\.system") as info:
        read_torch_checkpoint(evil)
    assert "evil.pth" in str(info.value)
    assert not marker.exists()


def test_not_a_zip_is_refused(tmp_path):
    legacy = tmp_path / "old.bin"
    legacy.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError, match="old.bin"):
        read_torch_checkpoint(legacy)


def test_torch_saved_file_matches_its_tensors(tmp_path):
    torch = pytest.importorskip("torch", reason="needs the test extra to write a real torch file")
    torch.manual_seed(0)
    base = torch.randn(6, 8)
    state = {
        "f32": torch.randn(3, 4, 5),
        "f16": torch.randn(7).half(),
        "bf16": torch.randn(2, 3).bfloat16(),
        "view": base[:, 2:5].t(),  # non-contiguous view into a shared storage
        "shared": base,
        "i64": torch.arange(5),
        "scalar": torch.tensor(2.5),
        "param": torch.nn.Parameter(torch.ones(2)),
    }
    torch.save(state, tmp_path / "w.pth")
    loaded = read_torch_checkpoint(tmp_path / "w.pth")
    assert loaded.keys() == state.keys()
    for key, tensor in state.items():
        value = loaded[key]
        if isinstance(value, Bfloat16Array):
            expected = tensor.float().numpy()
            np.testing.assert_array_equal(value.to_float32(), expected)
        else:
            np.testing.assert_array_equal(value, tensor.detach().numpy())


def test_reader_never_imports_torch(tmp_path):
    torch = pytest.importorskip("torch", reason="needs the test extra to write a real torch file")
    torch.save({"w": torch.ones(3)}, tmp_path / "w.pth")
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any 'import torch' now raises ImportError
        "from aimv2_mlx.convert.torch_pickle import read_torch_checkpoint\n"
        f"print(read_torch_checkpoint({str(tmp_path / 'w.pth')!r})['w'].sum())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "3.0"


def test_truncated_zip_is_a_clear_error(tmp_path):
    _torch_zip_with({"a": 1}, tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pth"):
        read_torch_checkpoint(tmp_path / "cut.pth")


def test_pth_folder_loads_like_its_safetensors_twin(tmp_path, transformers_reference):
    import json

    import torch
    from mlx.utils import tree_flatten
    from transformers import Aimv2VisionConfig, Aimv2VisionModel

    import aimv2_mlx

    torch.manual_seed(0)
    config = Aimv2VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=2, image_size=56, use_head=False)
    reference = Aimv2VisionModel(config)
    reference.save_pretrained(tmp_path / "st")
    (tmp_path / "pth").mkdir()
    torch.save({k: v.bfloat16() if "rms_norm" in k else v for k, v in reference.state_dict().items()},
               tmp_path / "pth" / "pytorch_model.bin")
    (tmp_path / "pth" / "config.json").write_text(json.dumps(config.to_dict()))
    twin = dict(tree_flatten(aimv2_mlx.load(tmp_path / "st").parameters()))
    loaded = dict(tree_flatten(aimv2_mlx.load(tmp_path / "pth").parameters()))
    assert loaded.keys() == twin.keys()
    for key, value in twin.items():
        if "norm" in key:  # stored as bfloat16 on purpose: exact after rounding the twin the same way
            assert loaded[key].dtype == mx.bfloat16
            value = value.astype(mx.bfloat16)
        assert np.array_equal(np.array(loaded[key].astype(mx.float32)), np.array(value.astype(mx.float32))), key
