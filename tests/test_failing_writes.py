"""A full disk, a damaged feature cache, a tampered probe.json and a corrupt tar member: each is
one line naming the file (exit 1 from the CLI) or is worked around, never a traceback.
The full disk is simulated by a monkeypatched write raising OSError(ENOSPC)."""

from __future__ import annotations

import errno
import io
import json
import tarfile
from pathlib import Path

import aimv2_mlx
from aimv2_mlx.cli.app import app
from aimv2_mlx.probe import ProbeClassifier, probe

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from .test_probe import _image_folder, _settings


def _full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _one_line_exit_1(result, *needles: str) -> None:
    """Exit 1 and one `error:` line (progress and step lines may come before it), no traceback."""
    assert result.exit_code == 1 and result.exc_info[0] is SystemExit, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in errors[0], result.output


def test_embed_on_a_full_disk_names_the_shard_it_could_not_write(tmp_path, monkeypatch):
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (40, 30), (9, 9, 9)).save(tmp_path / "photos" / "a.png")
    monkeypatch.setattr(np, "save", _full)
    result = CliRunner().invoke(
        app, ["embed", str(tmp_path / "photos"), "-o", str(tmp_path / "out"), "-m", "bundled"]
    )
    _one_line_exit_1(result, "shard-00000.npy", "the disk is full")
    assert not [p for p in (tmp_path / "out").iterdir() if ".tmp-" in p.name]


def test_pretrain_on_a_full_disk_names_the_checkpoint_file(tmp_path, monkeypatch):
    from aimv2_mlx.data.shapes import write_shapes

    data = write_shapes(tmp_path / "data", 4, size=28)
    monkeypatch.setattr(mx, "save_safetensors", _full)
    result = CliRunner().invoke(
        app,
        [
            "pretrain",
            str(data),
            "-o",
            str(tmp_path / "run"),
            "--width",
            "32",
            "--depth",
            "1",
            "--heads",
            "2",
            "--image-size",
            "28",
            "--steps",
            "1",
            "--no-compile",
            "-b",
            "2",
            "--vocab-size",
            "60",
            "--context-length",
            "8",
        ],
    )
    _one_line_exit_1(result, "the disk is full", "step-00000001")


def test_probe_on_a_full_disk_names_the_file(tmp_path, monkeypatch):
    data = _image_folder(tmp_path / "data", per_class=4)
    real_write_text = Path.write_text

    def full_for_probe_json(self, *args, **kwargs):
        if self.name == "probe.json":
            _full()
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_for_probe_json)
    result = CliRunner().invoke(
        app,
        [
            "probe",
            str(data),
            "-o",
            str(tmp_path / "out"),
            "-m",
            "bundled",
            "--heads",
            "linear",
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
    )
    _one_line_exit_1(result, "probe.json", "the disk is full")


def test_a_damaged_feature_cache_entry_is_a_miss_and_is_rewritten(tmp_path):
    model = aimv2_mlx.load("bundled")
    data = _image_folder(tmp_path / "data", per_class=4)
    settings = _settings(tmp_path, heads=("linear",))
    first = probe(data, tmp_path / "a", model, settings=settings, log=lambda m: None)
    entries = sorted((tmp_path / "cache").glob("*.npz"))
    assert entries
    for entry in entries:
        entry.write_bytes(entry.read_bytes()[:100])  # truncated mid-zip
    again = probe(data, tmp_path / "b", model, settings=settings, log=lambda m: None)
    assert again["heads"]["linear"]["top1"] == first["heads"]["linear"]["top1"]
    assert all(entry.stat().st_size > 100 for entry in entries)


@pytest.mark.parametrize(
    "tamper",
    [
        '{"format": "aimv2-mlx-probe"',
        '{"heads": 3}',
        '{"classes": ["a"], "heads": {}}',
        '{"classes": ["a", "b"], "model": {"load": null}, "features": {"blocks": null}, '
        '"heads": {"linear": {"file": "../../etc/passwd"}}}',
    ],
)
def test_a_tampered_probe_json_is_one_line(tmp_path, tamper):
    model = aimv2_mlx.load("bundled")
    data = _image_folder(tmp_path / "data", per_class=4)
    probe(
        data,
        tmp_path / "out",
        model,
        settings=_settings(tmp_path, heads=("linear",)),
        log=lambda m: None,
    )
    (tmp_path / "out" / "probe.json").write_text(tamper)
    with pytest.raises(ValueError, match=r"probe\.json"):
        ProbeClassifier(tmp_path / "out", model=model)
    Image.new("RGB", (30, 30), (200, 30, 30)).save(tmp_path / "red.png")
    result = CliRunner().invoke(
        app, ["classify", str(tmp_path / "red.png"), "--probe", str(tmp_path / "out")]
    )
    _one_line_exit_1(result, "probe.json")


def test_a_corrupt_tar_member_in_pretrain_is_replaced_and_listed(tmp_path):
    from aimv2_mlx.data.captioned import load_captioned
    from aimv2_mlx.tokenizer import train_tokenizer
    from aimv2_mlx.train.loop import pretrain

    from .test_pretrain import tiny_run

    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for i in range(8):
            buffer = io.BytesIO()
            Image.new("RGB", (32, 32), (30 * i, 20, 20)).save(buffer, "PNG")
            blob = buffer.getvalue() if i != 3 else buffer.getvalue()[:40]  # member 3 cut short
            for name, data in ((f"{i:04d}.png", blob), (f"{i:04d}.txt", f"square {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    source = load_captioned(tmp_path / "00000.tar")
    tok = train_tokenizer(source.captions(), 64, 10)
    record = pretrain(source, tmp_path / "run", tiny_run(tok, steps=4), tok, echo=lambda *_: None)
    failures = [
        json.loads(line) for line in (tmp_path / "run" / "failures.jsonl").read_text().splitlines()
    ]
    assert record["skipped"] == 1 and [f["sample"] for f in failures] == ["00000.tar:0003.png"]
