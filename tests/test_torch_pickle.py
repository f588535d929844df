"""PyTorch pickles are read without torch, and a malicious pickle is refused unexecuted."""

from __future__ import annotations

import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

from aimv2_mlx.torch_pickle import Bfloat16Array, read_torch_checkpoint
from aimv2_mlx.weights import CheckpointError

import mlx.core as mx
import numpy as np
import pytest

from .torch_zips import evil_checkpoint, torch_zip_with


def test_os_system_pickle_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    evil_checkpoint(evil, marker)
    with pytest.raises(CheckpointError, match=r"posix\.system|os\.system") as info:
        read_torch_checkpoint(evil)
    assert "evil.pth" in str(info.value)
    assert not marker.exists()


def test_not_a_zip_is_refused(tmp_path):
    legacy = tmp_path / "old.bin"
    legacy.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError, match=r"old\.bin"):
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
        "from aimv2_mlx.torch_pickle import read_torch_checkpoint\n"
        f"print(read_torch_checkpoint({str(tmp_path / 'w.pth')!r})['w'].sum())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "3.0"


def test_truncated_zip_is_a_clear_error(tmp_path):
    torch_zip_with({"a": 1}, tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pth"):
        read_torch_checkpoint(tmp_path / "cut.pth")


def test_pth_folder_loads_like_its_safetensors_twin(tmp_path, transformers_reference):
    import json

    import aimv2_mlx

    import torch
    from mlx.utils import tree_flatten
    from transformers import Aimv2VisionConfig, Aimv2VisionModel

    torch.manual_seed(0)
    config = Aimv2VisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=56,
        use_head=False,
    )
    reference = Aimv2VisionModel(config)
    reference.save_pretrained(tmp_path / "st")
    (tmp_path / "pth").mkdir()
    torch.save(
        {k: v.bfloat16() if "rms_norm" in k else v for k, v in reference.state_dict().items()},
        tmp_path / "pth" / "pytorch_model.bin",
    )
    (tmp_path / "pth" / "config.json").write_text(json.dumps(config.to_dict()))
    twin = dict(tree_flatten(aimv2_mlx.load(tmp_path / "st").parameters()))
    loaded = dict(tree_flatten(aimv2_mlx.load(tmp_path / "pth").parameters()))
    assert loaded.keys() == twin.keys()
    for key, value in twin.items():
        # stored as bfloat16 on purpose: exact after rounding the twin the same way
        if "norm" in key:
            assert loaded[key].dtype == mx.bfloat16
            value = value.astype(mx.bfloat16)
        assert np.array_equal(
            np.array(loaded[key].astype(mx.float32)), np.array(value.astype(mx.float32))
        ), key


# --- hostile pickles, assembled opcode by opcode (what torch.save writes, then bent) -------------


def _str(text: str) -> bytes:
    raw = text.encode()
    return b"X" + len(raw).to_bytes(4, "little") + raw  # BINUNICODE


def _int(n: int) -> bytes:
    raw = n.to_bytes(n.bit_length() // 8 + 1, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw  # LONG1


def _ints(values) -> bytes:
    return b"(" + b"".join(map(_int, values)) + b"t"  # MARK ... TUPLE


def _tensor(
    storage_key: str, numel: int, offset: int, size, stride, storage_type="FloatStorage"
) -> bytes:
    """torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())."""
    storage = (
        b"("
        + _str("storage")
        + f"ctorch\n{storage_type}\n".encode()
        + _str(storage_key)
        + _str("cpu")
        + _int(numel)
        + b"tQ"
    )  # persistent id tuple, BINPERSID
    return (
        b"ctorch._utils\n_rebuild_tensor_v2\n("
        + storage
        + _int(offset)
        + _ints(size)
        + _ints(stride)
        + b"\x89ccollections\nOrderedDict\n)Rt"
        + b"R"
    )


def _pth(
    path: Path, entries: dict[str, bytes], storages: dict[str, bytes], compress: bool = False
) -> Path:
    """A torch-style zip whose data.pkl is {name: <pickled value>} and whose storages are given."""
    pickled = b"\x80\x02}(" + b"".join(_str(k) + v for k, v in entries.items()) + b"u."
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickled)
        for key, data in storages.items():
            archive.writestr(
                f"archive/data/{key}",
                data,
                compress_type=zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED,
            )
    return path


_SIXTEEN = np.arange(16, dtype=np.float32).tobytes()


def test_a_hand_assembled_pickle_reads_back_its_strided_view(tmp_path):
    path = _pth(tmp_path / "ok.pth", {"w": _tensor("0", 16, 2, (3, 2), (4, 1))}, {"0": _SIXTEEN})
    np.testing.assert_array_equal(read_torch_checkpoint(path)["w"], [[2, 3], [6, 7], [10, 11]])


@pytest.mark.parametrize(
    "offset, size, stride",
    [
        (5, (4,), (-1,)),  # reads the bytes before the storage: process heap
        (0, (2, 2), (-(2**26), 1)),  # far outside: a segfault
        (0, (4,), (2**40,)),
        (-3, (2,), (1,)),
        (15, (2,), (1,)),  # one element past the end
        (0, (10**6, 10**6), (0, 0)),  # inside the storage, but a 4 TB copy
        (0, (2, 2), (1,)),  # sizes and strides disagree
    ],
)
def test_a_tensor_reaching_outside_its_storage_is_refused_before_any_read(
    tmp_path, offset, size, stride
):
    path = _pth(
        tmp_path / "bent.pth", {"w": _tensor("0", 16, offset, size, stride)}, {"0": _SIXTEEN}
    )
    with pytest.raises(CheckpointError, match=r"bent\.pth: refused to load: .*(storage|stride)"):
        read_torch_checkpoint(path)


def test_a_negative_stride_is_refused_by_the_command_in_one_line(tmp_path):
    (tmp_path / "src").mkdir()
    _pth(tmp_path / "src" / "model.pth", {"w": _tensor("0", 16, 5, (4,), (-1,))}, {"0": _SIXTEEN})
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "aimv2_mlx.cli",
            "convert",
            str(tmp_path / "src"),
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert (
        result.stderr.startswith("error: ")
        and "model.pth" in result.stderr
        and "negative" in result.stderr
    )
    assert not (tmp_path / "out").exists()


def _build_on_storage_type() -> bytes:
    """torch.FloatStorage, then BUILD with {'name': 'CharStorage'}: it would read as int8 ever
    after.
    """
    return b"ctorch\nFloatStorage\n}" + _str("name") + _str("CharStorage") + b"sb"


def test_a_build_opcode_cannot_change_the_readers_storage_types(tmp_path):
    clean = _pth(tmp_path / "clean.pth", {"w": _tensor("0", 16, 0, (16,), (1,))}, {"0": _SIXTEEN})
    hostile = _pth(tmp_path / "hostile.pth", {"t": _build_on_storage_type()}, {})
    with pytest.raises(CheckpointError, match=r"hostile\.pth: refused to load: .*BUILD"):
        read_torch_checkpoint(hostile)
    value = read_torch_checkpoint(clean)["w"]
    assert value.dtype == np.float32
    np.testing.assert_array_equal(value, np.arange(16, dtype=np.float32))


def test_a_build_opcode_cannot_bend_a_tensor_after_its_extent_was_checked(tmp_path):
    bent = _tensor("0", 16, 0, (4,), (1,)) + b"}" + _str("stride") + _ints((-(2**26),)) + b"sb"
    path = _pth(tmp_path / "bent.pth", {"w": bent}, {"0": _SIXTEEN})
    with pytest.raises(CheckpointError, match=r"bent\.pth: refused to load: .*BUILD"):
        read_torch_checkpoint(path)


def test_a_build_opcode_cannot_change_an_allow_listed_function(tmp_path):
    hostile = b"ctorch._utils\n_rebuild_tensor_v2\n}" + _str("function") + b"cbuiltins\nset\nsb"
    path = _pth(tmp_path / "hostile.pth", {"f": hostile}, {})
    with pytest.raises(CheckpointError, match="BUILD"):
        read_torch_checkpoint(path)
    clean = _pth(tmp_path / "clean.pth", {"w": _tensor("0", 16, 0, (2,), (1,))}, {"0": _SIXTEEN})
    np.testing.assert_array_equal(read_torch_checkpoint(clean)["w"], [0, 1])


def _zip_bomb(path: Path, claimed: int, tensor_numel: int) -> Path:
    """A .pth whose one storage deflates from a few MB into `claimed` bytes of zeros."""
    entries = {"w": _tensor("0", claimed // 4, 0, (tensor_numel,), (1,))}
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(
            "archive/data.pkl",
            b"\x80\x02}(" + b"".join(_str(k) + v for k, v in entries.items()) + b"u.",
        )
        info = zipfile.ZipInfo("archive/data/0")
        info.compress_type = zipfile.ZIP_DEFLATED
        chunk = bytes(64 << 20)
        with archive.open(info, "w", force_zip64=True) as handle:
            for _ in range(claimed // len(chunk)):
                handle.write(chunk)
    return path


_UNDER_AN_ADDRESS_SPACE_LIMIT = """
import resource, sys
import aimv2_mlx.cli.app
from aimv2_mlx.torch_pickle import read_torch_checkpoint
def vm_bytes():
    for line in open('/proc/self/status'):
        if line.startswith('VmSize:'):
            return int(line.split()[1]) * 1024
limit = vm_bytes() + int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
try:
    read_torch_checkpoint(sys.argv[1])
except Exception as exc:
    print(type(exc).__name__, exc)
"""


@pytest.mark.parametrize("tensor_numel", [4, 256 << 20])
def test_a_compressed_storage_claiming_a_gigabyte_is_refused_within_a_small_address_space(
    tmp_path, tensor_numel
):
    bomb = _zip_bomb(tmp_path / "bomb.pth", 1 << 30, tensor_numel)
    assert bomb.stat().st_size < 8 << 20
    result = subprocess.run(
        [sys.executable, "-c", _UNDER_AN_ADDRESS_SPACE_LIMIT, str(bomb), str(400 << 20)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("CheckpointError") and "bomb.pth" in result.stdout, (
        result.stdout
    )
    assert "zip bomb" in result.stdout


def test_a_compressed_pickle_claiming_a_gigabyte_is_refused_within_a_small_address_space(tmp_path):
    bomb = tmp_path / "bomb.pth"
    with zipfile.ZipFile(bomb, "w") as archive:
        info = zipfile.ZipInfo("archive/data.pkl")
        info.compress_type = zipfile.ZIP_DEFLATED
        with archive.open(info, "w", force_zip64=True) as handle:
            handle.write(b"\x80\x04\x8e" + (1 << 30).to_bytes(8, "little"))  # BINBYTES8 of 1 GiB
            for _ in range(16):
                handle.write(bytes(64 << 20))
            handle.write(b".")
    result = subprocess.run(
        [sys.executable, "-c", _UNDER_AN_ADDRESS_SPACE_LIMIT, str(bomb), str(400 << 20)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("CheckpointError") and "data.pkl" in result.stdout, (
        result.stdout
    )
    assert "zip bomb" in result.stdout


def test_a_storage_far_larger_than_its_tensors_is_refused(tmp_path):
    path = _pth(
        tmp_path / "padded.pth", {"w": _tensor("0", 1 << 20, 0, (4,), (1,))}, {"0": bytes(4 << 20)}
    )
    with pytest.raises(
        CheckpointError, match=r"padded\.pth: .*holds 4,194,304 bytes but its tensors use only 16"
    ):
        read_torch_checkpoint(path)


def test_a_tensor_reads_only_the_bytes_it_spans(tmp_path, monkeypatch):
    data = np.arange(1 << 18, dtype=np.float32)
    path = _pth(
        tmp_path / "w.pth",
        {
            "w": _tensor("0", data.size, 1000, (3,), (2,)),
            "v": _tensor("0", data.size, 0, (data.size,), (1,)),
        },
        {"0": data.tobytes()},
    )
    from aimv2_mlx.torch_pickle import open_torch_checkpoint

    tensor = open_torch_checkpoint(path)["w"]
    reads = []
    original = zipfile.ZipExtFile.read
    monkeypatch.setattr(
        zipfile.ZipExtFile, "read", lambda self, n=-1: reads.append(n) or original(self, n)
    )
    np.testing.assert_array_equal(tensor.numpy(), [1000, 1002, 1004])
    # not the 1 MB storage
    assert reads and all(n >= 0 for n in reads) and sum(reads) <= (1000 + 5) * 4, reads
