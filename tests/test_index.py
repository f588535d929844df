"""`aimv2 index`: incremental updates of a living folder, crash safety, refusals.

Images are tiny generated PNGs embedded by the bundled model, so 500 of them take seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import aimv2_mlx
from aimv2_mlx.data.sources import Item
from aimv2_mlx.folders import locked
from aimv2_mlx.index import IndexFolderError, open_index, update_index

import numpy as np
import pytest
from PIL import Image

from .conftest import one_line_error, run_cli, tiny_config


@pytest.fixture(scope="module")
def bundled():
    return aimv2_mlx.load("bundled")


def write_png(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def make_folder(root: Path, count: int, per_folder: int = 50) -> list[Path]:
    return [
        write_png(root / f"f{i // per_folder:02d}" / f"img{i:04d}.png", i) for i in range(count)
    ]


def by_path(folder: Path) -> dict[str, np.ndarray]:
    index = open_index(folder)
    return dict(zip(index.paths, np.asarray(index.vectors), strict=True))


def test_an_update_embeds_new_and_changed_files_and_finds_a_renamed_folder_by_content(
    tmp_path, bundled, monkeypatch
):
    photos = tmp_path / "photos"
    make_folder(photos, 500)
    first = update_index(photos, tmp_path / "index", bundled)
    assert (first.embedded, first.reused, first.removed, first.total) == (500, 0, 0, 500)

    added = write_png(photos / "f00" / "new.png", 10_000)
    modified = write_png(photos / "f01" / "img0050.png", 20_000)
    (photos / "f02" / "img0100.png").unlink()
    (photos / "f03").rename(photos / "renamed")
    opened = []
    real_open = Item.open
    monkeypatch.setattr(
        Item, "open", lambda item: opened.append(Path(item.path).name) or real_open(item)
    )
    update = update_index(photos, tmp_path / "index", bundled)
    # 500 + 1 added - 1 deleted = 500 files: 2 embedded, the other 498 reused (50 through content).
    assert (update.embedded, update.removed, update.reused, update.moved, update.total) == (
        2,
        1,
        498,
        50,
        500,
    )
    assert update.to_dict() == {
        "embedded": 2,
        "reused": 498,
        "removed": 1,
        "failed": 0,
        "total": 500,
    }
    renamed = {p.name for p in (photos / "renamed").iterdir()}
    # unchanged files: a stat, never opened
    assert set(opened) == {added.name, modified.name} | renamed
    monkeypatch.undo()

    fresh = update_index(photos, tmp_path / "fresh", bundled)
    assert fresh.embedded == 500
    updated, expected = by_path(tmp_path / "index"), by_path(tmp_path / "fresh")
    assert sorted(updated) == sorted(expected) and str((photos / "renamed").resolve()) in next(
        p for p in updated if "renamed" in p
    )
    assert max(np.abs(updated[p] - expected[p]).max() for p in expected) <= 1e-6
    assert open_index(tmp_path / "index").paths == sorted(updated)  # rows in path order


def test_read_embeddings_reads_an_index_like_an_embed_folder(tmp_path, bundled):
    photos = tmp_path / "photos"
    make_folder(photos, 6)
    update_index(photos, tmp_path / "index", bundled)
    vectors, metadata = aimv2_mlx.read_embeddings(tmp_path / "index")
    # the bundled model is a LiT: its index holds the projected image embedding (pool "head")
    embedded = aimv2_mlx.embed(sorted(photos.rglob("*.png")), bundled, pool="head", normalize=True)
    assert metadata.column("path").to_pylist() == [str(p) for p in sorted(photos.rglob("*.png"))]
    assert np.abs(vectors - embedded).max() <= 1e-5
    assert metadata.column("width").to_pylist() == [8] * 6


def test_unusable_files_are_listed_and_not_reopened_while_unchanged(tmp_path, bundled, monkeypatch):
    photos = tmp_path / "photos"
    make_folder(photos, 3)
    (photos / "broken.png").write_bytes(b"not a png")
    first = update_index(photos, tmp_path / "index", bundled)
    assert (first.embedded, first.failed, first.total) == (3, 1, 3)
    failures = [
        json.loads(line)
        for line in (tmp_path / "index" / "failures.jsonl").read_text().splitlines()
    ]
    assert [Path(f["path"]).name for f in failures] == ["broken.png"] and failures[0]["reason"]
    monkeypatch.setattr(Item, "open", lambda item: pytest.fail(f"{item.path} was opened"))
    again = update_index(photos, tmp_path / "index", bundled)
    assert (again.embedded, again.reused, again.failed) == (0, 3, 1)


def test_an_index_of_another_model_is_refused_in_one_line(tmp_path, bundled):
    photos = tmp_path / "photos"
    make_folder(photos, 2)
    update_index(photos, tmp_path / "index", bundled)
    other = aimv2_mlx.build(tiny_config())
    with pytest.raises(IndexFolderError, match="different model"):
        update_index(photos, tmp_path / "index", other)
    aimv2_mlx.save(other, tmp_path / "other-model")
    result = run_cli("index", photos, "-o", tmp_path / "index", "-m", tmp_path / "other-model")
    one_line_error(
        result, str(tmp_path / "index"), "different model", "aimv2-tiny-patch14-56-shapes"
    )


def test_a_foreign_folder_and_a_locked_index_are_refused_in_one_line(tmp_path, bundled):
    photos = tmp_path / "photos"
    make_folder(photos, 2)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    one_line_error(
        run_cli("index", photos, "-o", tmp_path / "notes", "-m", "bundled"), "not an aimv2 index"
    )
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"
    with locked(tmp_path / "index"):
        one_line_error(
            run_cli("index", photos, "-o", tmp_path / "index", "-m", "bundled"), "in use by PID"
        )
    one_line_error(
        run_cli(
            "search", "--index", tmp_path / "nowhere", "--image", photos / "f00" / "img0000.png"
        ),
        "not an aimv2 index",
    )


def test_cli_index_json_counts_and_the_index_remembers_its_model(tmp_path):
    photos = tmp_path / "photos"
    make_folder(photos, 4)
    result = run_cli("index", photos, "-o", tmp_path / "index", "-m", "bundled", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "embedded": 4,
        "reused": 0,
        "removed": 0,
        "failed": 0,
        "total": 4,
    }
    (photos / "f00" / "img0001.png").unlink()
    # no -m: the index's own model
    result = run_cli("index", photos, "-o", tmp_path / "index", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "embedded": 0,
        "reused": 3,
        "removed": 1,
        "failed": 0,
        "total": 3,
    }


def test_ctrl_c_keeps_the_finished_vectors_for_the_next_run(tmp_path, bundled, monkeypatch):
    import aimv2_mlx.index as index_module

    photos = tmp_path / "photos"
    make_folder(photos, 12)
    monkeypatch.setattr(index_module, "PENDING_CHUNK", 4)
    real = index_module.embed_batches

    def interrupted(*args, **kwargs):
        for count, batch in enumerate(real(*args, **kwargs)):
            if count == 2:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(index_module, "embed_batches", interrupted)
    with pytest.raises(KeyboardInterrupt):
        update_index(photos, tmp_path / "index", bundled, batch_size=4)
    monkeypatch.setattr(index_module, "embed_batches", real)
    resumed = update_index(photos, tmp_path / "index", bundled, batch_size=4)
    assert (resumed.embedded, resumed.total) == (4, 12)  # the 8 finished before Ctrl-C were kept
    assert not list((tmp_path / "index").glob("pending-*"))
    update_index(photos, tmp_path / "fresh", bundled)
    updated, expected = by_path(tmp_path / "index"), by_path(tmp_path / "fresh")
    assert max(np.abs(updated[p] - expected[p]).max() for p in expected) <= 1e-6


# Runs an update that stops, at the named step, to wait for the test's SIGKILL.
KILLED_UPDATE = textwrap.dedent("""
    import sys, time
    import aimv2_mlx, aimv2_mlx.index as index
    point = sys.argv[3]
    index.PENDING_CHUNK = 4
    real_write = index.atomic_write
    def atomic_write(path, write):
        real_write(path, write)
        if (point == "pending" and path.name == "pending-2.npy") or (
                point == "vectors" and path.name.startswith("vectors-")) or (
                point == "failures" and path.name == "failures.jsonl"):
            print("READY", flush=True)
            time.sleep(600)
    index.atomic_write = atomic_write
    index.update_index(sys.argv[1], sys.argv[2], aimv2_mlx.load("bundled"), batch_size=4)
""")


@pytest.mark.parametrize("point", ["pending", "vectors", "failures"])
def test_kill_9_during_an_update_then_a_rerun_equals_an_uninterrupted_update(
    tmp_path, bundled, point
):
    photos = tmp_path / "photos"
    make_folder(photos, 30, per_folder=10)
    update_index(photos, tmp_path / "killed", bundled)
    shutil.copytree(tmp_path / "killed", tmp_path / "uninterrupted")
    for i in range(12):
        write_png(photos / "new" / f"n{i}.png", 500 + i)
    (photos / "f00" / "img0003.png").unlink()
    (photos / "f01").rename(photos / "moved")
    before = by_path(tmp_path / "killed")

    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_UPDATE, str(photos), str(tmp_path / "killed"), point],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "READY"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    if point != "failures":  # killed before its commit: the old index, whole
        after_kill = by_path(tmp_path / "killed")
        assert sorted(after_kill) == sorted(before)
        assert max(np.abs(after_kill[p] - before[p]).max() for p in before) == 0

    rerun = update_index(photos, tmp_path / "killed", bundled)
    expected = update_index(photos, tmp_path / "uninterrupted", bundled)
    assert rerun.total == expected.total == 41 and rerun.removed == (
        0 if point == "failures" else 1
    )
    killed, uninterrupted = by_path(tmp_path / "killed"), by_path(tmp_path / "uninterrupted")
    assert sorted(killed) == sorted(uninterrupted)
    assert max(np.abs(killed[p] - uninterrupted[p]).max() for p in killed) <= 1e-6
    assert sorted(p.name for p in (tmp_path / "killed").iterdir()) == sorted(
        p.name for p in (tmp_path / "uninterrupted").iterdir()
    )
    if point == "pending":
        assert rerun.embedded == 8  # the first chunk of 4, saved before the kill, was reused


@pytest.mark.parametrize(
    "damage", ["garbage database", "rows past the vectors", "truncated vectors"]
)
def test_a_damaged_index_is_one_line_naming_its_file(tmp_path, bundled, damage):
    import sqlite3

    photos = tmp_path / "photos"
    make_folder(photos, 3)
    update_index(photos, tmp_path / "index", bundled)
    database, vectors = tmp_path / "index" / "index.sqlite", tmp_path / "index" / "vectors-1.npy"
    if damage == "garbage database":
        database.write_bytes(b"\0garbage" * 100)
        named = "index.sqlite"
    elif damage == "rows past the vectors":
        with sqlite3.connect(database) as db:
            db.execute("UPDATE files SET row = row + 1000")
        named = "vectors-1.npy"
    else:
        vectors.write_bytes(vectors.read_bytes()[:100])
        named = "vectors-1.npy"
    example = photos / "f00" / "img0000.png"
    one_line_error(run_cli("search", "--index", tmp_path / "index", "--image", example), named)
    one_line_error(run_cli("index", photos, "-o", tmp_path / "index", "-m", "bundled"), named)
    one_line_error(run_cli("dupes", "--index", tmp_path / "index"), named)
