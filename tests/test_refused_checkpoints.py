"""Hostile and damaged checkpoints: each is refused in one line naming the file, before any model
is built and without memory that grows with what the file claims; a full disk during `convert`
is one line too. Every file here is built by the test itself."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import aimv2_mlx
import aimv2_mlx.model
from aimv2_mlx.checkpoint_io import open_checkpoint
from aimv2_mlx.cli.app import app
from aimv2_mlx.convert import convert
from aimv2_mlx.safetensors_io import read_header, read_tensor
from aimv2_mlx.weights import CheckpointError

import huggingface_hub.constants
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from .conftest import tiny_config

PHOTO = Path(__file__).resolve().parents[1] / "examples" / "photos" / "chelsea.jpg"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cli(*args) -> tuple[int, str]:
    """Run `aimv2 ARGS` in this process: (exit code, stderr); an uncaught exception fails the
    test.
    """
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stderr


def _assert_one_line(code: int, stderr: str, *needles: str) -> None:
    line = stderr.strip()
    assert code == 1 and "\n" not in line and line.startswith("error: "), stderr
    for needle in needles:
        assert needle in line, line


def _tiny_folder(folder: Path, **vision) -> Path:
    mx.random.seed(0)
    config = tiny_config()
    for key, value in vision.items():
        setattr(config.vision, key, value)
    return aimv2_mlx.save(aimv2_mlx.build(config), folder)


def _edit_config(folder: Path, edit) -> None:
    data = json.loads((folder / "config.json").read_text())
    edit(data)
    (folder / "config.json").write_text(json.dumps(data))


# --- safetensors headers -------------------------------------------------------------------------


def _rewrite_header(path: Path, edit) -> None:
    """Re-serialise a safetensors file with its JSON header changed by `edit` (bytes kept)."""
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    new = edit(header)
    new = new if isinstance(new, bytes) else json.dumps(header).encode()
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + length :])


def _first(header: dict) -> dict:
    return header[sorted(k for k in header if k != "__metadata__")[0]]


def _second(header: dict) -> dict:
    return header[sorted(k for k in header if k != "__metadata__")[1]]


HEADER_DAMAGE = {
    "dtype of the wrong type": (lambda h: _first(h).update(dtype=["F32"]), "unsupported dtype"),
    "unknown dtype": (lambda h: _first(h).update(dtype="F8_E9M9"), "unsupported dtype"),
    "shape of floats": (
        lambda h: _first(h).update(shape=[float(n) for n in _first(h)["shape"]]),
        "shape",
    ),
    "shape as a string": (lambda h: _first(h).update(shape="64"), "shape"),
    "shape of booleans": (
        lambda h: _first(h).update(shape=[True] * len(_first(h)["shape"])),
        "shape",
    ),
    "negative dimension": (
        lambda h: _first(h).update(shape=[-1, *_first(h)["shape"][1:]]),
        "shape",
    ),
    "offsets as strings": (
        lambda h: _first(h).update(data_offsets=[str(n) for n in _first(h)["data_offsets"]]),
        "data_offsets",
    ),
    "negative offset": (
        lambda h: _first(h).update(data_offsets=[-4, _first(h)["data_offsets"][1] - 4]),
        "byte range",
    ),
    "offsets beyond the file": (
        lambda h: _first(h).update(shape=[10**9], data_offsets=[0, 4 * 10**9]),
        "truncated",
    ),
    "shape and offsets disagree": (
        lambda h: _first(h).update(data_offsets=[0, 12]),
        "does not fit",
    ),
    "overlapping tensors": (
        lambda h: _second(h).update(
            data_offsets=_first(h)["data_offsets"],
            shape=_first(h)["shape"],
            dtype=_first(h)["dtype"],
        ),
        "overlap",
    ),
    "entry not an object": (
        lambda h: h.update({sorted(k for k in h if k != "__metadata__")[0]: [1, 2]}),
        "malformed header entry",
    ),
    "non-JSON header": (lambda h: b"\xff\xfe not json at all", "unreadable header"),
    "deeply nested JSON": (lambda h: b"[" * 200_000, "unreadable header"),
}


@pytest.mark.parametrize("damage", HEADER_DAMAGE)
def test_a_malformed_safetensors_header_field_is_refused_in_one_line(tmp_path, damage):
    folder = _tiny_folder(tmp_path / "model")
    edit, needle = HEADER_DAMAGE[damage]
    _rewrite_header(folder / "model.safetensors", edit)
    code, stderr = _cli("info", folder)
    _assert_one_line(code, stderr, "model.safetensors", needle)


def test_a_huge_header_length_is_refused_without_reading_it(tmp_path):
    folder = _tiny_folder(tmp_path / "model")
    raw = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes((2**63).to_bytes(8, "little") + raw[8:])
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: truncated or not a safetensors file"
    ):
        open_checkpoint(folder)


# --- sharded checkpoints in the Hugging Face cache ----------------------------------------------


def _sharded_in_cache(tmp_path: Path, repo: str) -> tuple[Path, dict[str, mx.array]]:
    """A sharded model laid out as the hub cache does: snapshot files are symlinks into blobs/."""
    mx.random.seed(0)
    model = aimv2_mlx.build(tiny_config())
    weights = dict(tree_flatten(model.parameters()))
    keys = sorted(weights)
    base = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot, blobs = base / "snapshots" / COMMIT, base / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    shards = {
        "model-00001-of-00002.safetensors": keys[: len(keys) // 2],
        "model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
    }
    for name, part in shards.items():
        mx.save_safetensors(str(blobs / f"blob-{name}"), {k: weights[k] for k in part})
    (blobs / "blob-index").write_text(
        json.dumps({"weight_map": {k: n for n, ks in shards.items() for k in ks}})
    )
    model.config.save(blobs)
    (blobs / "config.json").rename(blobs / "blob-config")
    files = {
        **{name: f"blob-{name}" for name in shards},
        "model.safetensors.index.json": "blob-index",
        "config.json": "blob-config",
    }
    for name, blob in files.items():
        (snapshot / name).symlink_to(Path("..", "..", "blobs", blob))
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(COMMIT)
    return snapshot, weights


def test_a_sharded_checkpoint_in_the_hub_cache_loads_and_converts(tmp_path, monkeypatch):
    snapshot, weights = _sharded_in_cache(tmp_path, "someone/aimv2-sharded")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = dict(tree_flatten(aimv2_mlx.load("someone/aimv2-sharded").parameters()))
    assert loaded.keys() == weights.keys()
    assert all(np.array_equal(np.array(loaded[k]), np.array(weights[k])) for k in weights)
    convert(snapshot, tmp_path / "out")
    converted = mx.load(str(tmp_path / "out" / "model.safetensors"))
    assert all(np.array_equal(np.array(converted[k]), np.array(weights[k])) for k in weights)


@pytest.mark.parametrize(
    "shard",
    [
        "../elsewhere.safetensors",
        "/tmp/elsewhere.safetensors",
        "sub/../../elsewhere.safetensors",
        "..\\elsewhere.safetensors",
        "C:/elsewhere.safetensors",
        "",
    ],
)
def test_an_index_naming_a_shard_outside_its_folder_is_refused_by_name(tmp_path, shard):
    folder = _tiny_folder(tmp_path / "model")
    weights = mx.load(str(folder / "model.safetensors"))
    weight_map = {k: "model.safetensors" for k in weights}
    weight_map[sorted(weights)[0]] = shard
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shutil.copy(folder / "model.safetensors", tmp_path / "elsewhere.safetensors")
    code, stderr = _cli("info", folder)
    _assert_one_line(code, stderr, "model.safetensors.index.json", "outside its folder")


@pytest.mark.parametrize("weight_map", [["model.safetensors"], {"a": 3}, "model.safetensors"])
def test_an_index_whose_weight_map_is_not_names_to_files_is_refused(tmp_path, weight_map):
    folder = _tiny_folder(tmp_path / "model")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    code, stderr = _cli("convert", folder, tmp_path / "out")
    _assert_one_line(code, stderr, "model.safetensors.index.json", "not a safetensors index")


# --- configs: every field checked, and checked against the tensors before building ---------------

OUR_CONFIG_DAMAGE = {
    "zero heads": ({"num_attention_heads": 0}, "vision.num_attention_heads"),
    "negative heads": ({"num_attention_heads": -2}, "vision.num_attention_heads"),
    "heads not dividing the width": ({"num_attention_heads": 3}, "not divisible"),
    "heads as a string": ({"num_attention_heads": "2"}, "vision.num_attention_heads"),
    "heads as a boolean": ({"num_attention_heads": True}, "vision.num_attention_heads"),
    "huge width": ({"hidden_size": 10**9}, "vision.hidden_size"),
    "zero patch": ({"patch_size": 0}, "vision.patch_size"),
    "image not a multiple of the patch": ({"image_size": 50}, "multiple"),
    "negative eps": ({"rms_norm_eps": -1.0}, "vision.rms_norm_eps"),
    "is_native as a string": ({"is_native": "no"}, "vision.is_native"),
    "more blocks than the checkpoint": ({"num_hidden_layers": 3}, "3 blocks, the checkpoint 2"),
    "a wider model than the checkpoint": (
        {"hidden_size": 128, "num_attention_heads": 2},
        "patchifier",
    ),
}


@pytest.mark.parametrize("damage", OUR_CONFIG_DAMAGE)
def test_a_bad_field_of_our_config_is_refused_before_any_model_is_built(
    tmp_path, monkeypatch, damage
):
    folder = _tiny_folder(tmp_path / "model")
    fields, needle = OUR_CONFIG_DAMAGE[damage]
    _edit_config(folder, lambda data: data["vision"].update(fields))

    def no_build(config):
        raise AssertionError("a model was built from a config that should have been refused")

    monkeypatch.setattr(aimv2_mlx.model, "build", no_build)
    with pytest.raises(CheckpointError) as info:
        aimv2_mlx.load(folder)
    assert str(info.value).startswith(str(folder)) and needle in str(info.value), info.value


@pytest.mark.parametrize("section", [None, "vision", "preprocess"])
def test_a_config_section_of_the_wrong_type_is_refused_in_one_line(tmp_path, section):
    folder = _tiny_folder(tmp_path / "model")
    if section is None:
        (folder / "config.json").write_text("[1, 2, 3]")
    else:
        _edit_config(folder, lambda data: data.update({section: [1, 2]}))
    _assert_one_line(*_cli("info", folder), "config.json")


def _transformers_folder(folder: Path, **config) -> Path:
    """A transformers-layout checkpoint of the tiny model (names mapped by hand) and its
    config.json.
    """
    mx.random.seed(0)
    ours = dict(tree_flatten(aimv2_mlx.build(tiny_config()).parameters()))
    theirs = {}
    for key, value in ours.items():
        if key == "preprocessor.patchifier.proj.weight":
            theirs["embeddings.patch_embed.weight"] = value.transpose(0, 3, 1, 2)
        elif key == "preprocessor.patchifier.proj.bias":
            theirs["embeddings.patch_embed.bias"] = value
        elif key == "preprocessor.patchifier.norm.weight":
            theirs["embeddings.rms_norm.weight"] = value
        elif key == "preprocessor.pos_embed":
            theirs["embeddings.position_embedding.weight"] = value[0]
        elif key == "trunk.post_trunk_norm.weight":
            theirs["rms_norm.weight"] = value
        else:
            block, rest = key.removeprefix("trunk.blocks.").split(".", 1)
            if rest == "attn.qkv.weight":
                for i, part in enumerate("qkv"):
                    theirs[f"encoder.layers.{block}.attention.{part}_proj.weight"] = value[
                        i * 64 : (i + 1) * 64
                    ]
                continue
            name = {
                "norm_1.weight": "rms_norm1.weight",
                "norm_2.weight": "rms_norm2.weight",
                "attn.proj.weight": "attention.out_proj.weight",
                "mlp.fc1.weight": "ffn.gate_proj.weight",
                "mlp.fc3.weight": "ffn.up_proj.weight",
                "mlp.fc2.weight": "ffn.down_proj.weight",
            }[rest]
            theirs[f"encoder.layers.{block}.{name}"] = value
    folder.mkdir()
    mx.save_safetensors(str(folder / "model.safetensors"), theirs)
    (folder / "config.json").write_text(json.dumps({"model_type": "aimv2_vision_model", **config}))
    return folder


def test_the_transformers_folder_of_these_tests_loads_as_the_tiny_model(tmp_path):
    model = aimv2_mlx.load(_transformers_folder(tmp_path / "hf", num_attention_heads=2))
    assert model.config.vision.num_hidden_layers == 2 and model.config.vision.hidden_size == 64


@pytest.mark.parametrize(
    "config, needle",
    [
        ({"num_attention_heads": 0}, "num_attention_heads"),
        ({"num_attention_heads": -2}, "num_attention_heads"),
        ({"num_attention_heads": 2.5}, "num_attention_heads"),
        ({"rms_norm_eps": "tiny"}, "rms_norm_eps"),
        ({"vision_config": "none"}, "vision_config"),
    ],
)
def test_a_bad_field_of_a_transformers_config_is_refused_naming_the_file(tmp_path, config, needle):
    folder = _transformers_folder(tmp_path / "hf", **config)
    code, stderr = _cli("convert", folder, tmp_path / "out")
    _assert_one_line(code, stderr, str(folder / "config.json"), needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "contents",
    [
        '{"crop_size": -5}',
        '{"crop_size": {"height": 10000000}}',
        '{"image_mean": 0.5}',
        "[1]",
        b"\xff\xfe{}",
        "[" * 100_000,
    ],
)
def test_a_bad_preprocessor_config_is_refused_naming_that_file(tmp_path, contents):
    folder = _transformers_folder(tmp_path / "hf", num_attention_heads=2)
    pre = folder / "preprocessor_config.json"
    pre.write_bytes(contents if isinstance(contents, bytes) else contents.encode())
    _assert_one_line(*_cli("info", folder), str(pre))


def test_zero_heads_is_refused_by_embed_in_one_line(tmp_path):
    folder = _tiny_folder(tmp_path / "model")
    _edit_config(folder, lambda data: data["vision"].update(num_attention_heads=0))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "aimv2_mlx.cli",
            "embed",
            str(PHOTO),
            "-m",
            str(folder),
            "-o",
            str(tmp_path / "vectors"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    _assert_one_line(result.returncode, result.stderr, "config.json", "num_attention_heads")


def test_a_block_numbered_ten_million_is_refused_before_building(tmp_path, monkeypatch):
    folder = _transformers_folder(tmp_path / "hf", num_attention_heads=2)
    weights = mx.load(str(folder / "model.safetensors"))
    weights["encoder.layers.9999999.rms_norm1.weight"] = weights[
        "encoder.layers.1.rms_norm1.weight"
    ]
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    monkeypatch.setattr(aimv2_mlx.model, "build", lambda config: pytest.fail("built a model"))
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: block 2 of 10000000 .* has no tensors"
    ):
        aimv2_mlx.load(folder)


_TEN_MILLION_BLOCKS = """
import resource, sys, time
import aimv2_mlx.cli.app
from aimv2_mlx.weights import CheckpointError
def vm_bytes():
    for line in open('/proc/self/status'):
        if line.startswith('VmSize:'):
            return int(line.split()[1]) * 1024
limit = vm_bytes() + (512 << 20)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
start = time.perf_counter()
try:
    aimv2_mlx.load(sys.argv[1])
except CheckpointError as exc:
    print(f"{time.perf_counter() - start:.3f}", exc)
"""


def test_ten_million_blocks_in_our_config_are_refused_in_milliseconds_within_a_small_address_space(
    tmp_path,
):
    folder = _tiny_folder(tmp_path / "model")
    _edit_config(folder, lambda data: data["vision"].update(num_hidden_layers=10**7))
    result = subprocess.run(
        [sys.executable, "-c", _TEN_MILLION_BLOCKS, str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and result.stdout, result.stderr[-2000:]
    seconds, message = result.stdout.split(" ", 1)
    assert float(seconds) < 0.5 and "config.json" in message and "num_hidden_layers" in message


def test_a_bad_override_flag_is_refused_in_one_line(tmp_path):
    folder = _tiny_folder(tmp_path / "model")
    _assert_one_line(*_cli("convert", folder, tmp_path / "out", "--num-heads", "-3"), "--num-heads")
    _assert_one_line(
        *_cli("convert", folder, tmp_path / "out", "--image-size", "0"), "--image-size"
    )
    assert not (tmp_path / "out").exists()


# --- a full disk during convert -----------------------------------------------------------------

_FULL_DISK = """
import builtins, errno
import aimv2_mlx.safetensors_io as safetensors_io

class FullDisk:
    def __init__(self, handle):
        self.handle = handle
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.handle.close()
    def write(self, data):
        if len(data) > 64:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.handle.write(data)

def full_disk_open(path, mode="r"):
    return FullDisk(builtins.open(path, mode)) if "w" in mode else builtins.open(path, mode)

safetensors_io.open = full_disk_open
"""


def test_a_full_disk_during_convert_is_one_line_naming_the_file_and_leaves_nothing(tmp_path):
    folder = _tiny_folder(tmp_path / "model")
    code = (
        f"{_FULL_DISK}\nimport sys\nfrom aimv2_mlx.cli.app import main\n"
        "sys.argv = ['aimv2', *sys.argv[1:]]\nmain()"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "convert", str(folder), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    _assert_one_line(
        result.returncode,
        result.stderr,
        str(tmp_path / "out" / "model.safetensors"),
        "no space left on device",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_real_full_disk_during_convert_is_one_line_and_leaves_the_disk_empty(tmp_path):
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to mount a private tmpfs")
    folder = _tiny_folder(tmp_path / "model")
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "out"
    script = (
        f"mount -t tmpfs -o size=64k tmpfs {shlex.quote(str(disk))} || exit 77; "
        f"{shlex.quote(sys.executable)} -m aimv2_mlx.cli convert {shlex.quote(str(folder))} "
        f"{shlex.quote(str(out))}; code=$?; ls -A {shlex.quote(str(disk))}; exit $code"
    )
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if result.returncode == 77:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    _assert_one_line(
        result.returncode, result.stderr, str(out / "model.safetensors"), "no space left on device"
    )
    assert result.stdout == ""  # nothing left on the full disk


def test_a_safetensors_file_cut_short_after_its_header_was_read_is_refused(tmp_path):
    path = _tiny_folder(tmp_path / "model") / "model.safetensors"
    entries = read_header(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    last = max(entries.values(), key=lambda entry: entry.start)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated"):
        read_tensor(path, last)


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [
        ("encoder", "num_attention_heads", 0),
        ("encoder", "num_hidden_layers", 10**7),
        ("decoder", "num_attention_heads", -2),
        ("decoder", "context_length", 0),
    ],
)
def test_a_run_config_with_impossible_sizes_is_refused_before_building(section, field, value):
    from aimv2_mlx.train.config import PretrainConfig

    data = PretrainConfig.from_preset("tiny", 64, 8).to_dict()
    data[section][field] = value
    with pytest.raises(ValueError, match=f"{section}.{field}"):
        PretrainConfig.from_dict(data)
