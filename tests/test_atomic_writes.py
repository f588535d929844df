"""`folders.atomic_write` / `atomic_folder`, the one temp-then-rename every writer uses: a target
is complete or as it was, whatever stops the write, and a full disk names the file."""

from __future__ import annotations

import errno

from aimv2_mlx.folders import TEMPORARY, DiskFullError, atomic_folder, atomic_write, write_json

import pytest


def test_a_finished_folder_appears_whole_under_its_name_and_no_temporary_is_left(tmp_path):
    with atomic_folder(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("a")
        assert not (tmp_path / "out").exists() and TEMPORARY.fullmatch(tmp.name)["name"] == "out"
    assert (tmp_path / "out" / "a.txt").read_text() == "a"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("stop", [RuntimeError("a bug"), KeyboardInterrupt()])
def test_a_folder_whose_writing_stops_leaves_nothing_behind(tmp_path, stop):
    with pytest.raises(type(stop)), atomic_folder(tmp_path / "out") as tmp:
        (tmp / "half.bin").write_bytes(b"x" * 10)
        raise stop
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_inside_a_folder_names_the_file_under_the_final_name(tmp_path):
    with (
        pytest.raises(DiskFullError, match="the disk is full") as info,
        atomic_folder(tmp_path / "out") as tmp,
    ):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "model.safetensors"))
    assert str(info.value).startswith(f"{tmp_path / 'out' / 'model.safetensors'}: ")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_file_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"step": 1})

    def fail(tmp):
        tmp.write_text("{half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match=r"metrics\.json: cannot write, the disk is full"):
        atomic_write(path, fail)
    assert path.read_text() == '{\n  "step": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
