"""File discovery: order, skips, symlinks, file lists and WebDataset tars."""

from __future__ import annotations

import io
import os
import tarfile

from aimv2_mlx.data.sources import discover

import pytest


def test_folder_order_and_skips(tmp_path):
    root = tmp_path / ".hidden-root-is-fine"
    keep = [
        "b.jpg",
        "A.png",
        "a/c.jpeg",
        "a b/d.webp",
        "sub/deeper/z.TIFF",
        "x.Gif",
        "m.bmp",
        "h.heic",
    ]
    skip = [
        ".hidden.jpg",
        "a/.also-hidden.png",
        "._b.jpg",
        "a/._c.jpeg",
        ".git/x.jpg",
        ".cache/sub/y.png",
        "notes.txt",
        "LICENSES.md",
        "raw.cr2",
        "noext",
    ]
    for i, rel in enumerate(keep + skip):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x" * (i + 1))  # distinct files
    (root / "folder.jpg").mkdir()  # a directory with an image suffix
    items = discover([root])
    # plain string order of the relative POSIX path ("a b/..." before "a/...": ' ' < '/')
    assert [i.key for i in items] == [
        "A.png",
        "a b/d.webp",
        "a/c.jpeg",
        "b.jpg",
        "h.heic",
        "m.bmp",
        "sub/deeper/z.TIFF",
        "x.Gif",
    ]
    assert all(os.path.isfile(i.path) and i.size == os.path.getsize(i.path) for i in items)
    with pytest.raises(FileNotFoundError, match="empty-or-missing"):
        discover([tmp_path / "empty-or-missing"])


def test_symlinks_followed_without_loops_and_files_kept_once(tmp_path):
    outside = tmp_path / "outside"
    (outside / "deep").mkdir(parents=True)
    (outside / "deep" / "o.png").write_bytes(b"outside")
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "s.png").write_bytes(b"inside")
    os.symlink(outside, root / "linked")  # a folder elsewhere: followed
    os.symlink(root, root / "sub" / "loop")  # back to an ancestor: not followed again
    os.symlink(root / "sub" / "s.png", root / "alias.png")  # the same file twice: kept once
    keys = [i.key for i in discover([root])]
    assert keys == ["alias.png", "linked/deep/o.png"]


def test_non_utf8_name_is_shown_escaped(tmp_path):
    os.close(os.open(os.fsencode(tmp_path) + b"/caf\xe9.png", os.O_CREAT | os.O_WRONLY))
    (item,) = discover([tmp_path])
    assert item.key == "caf\\xe9.png" and os.path.exists(item.path)


def test_file_list_and_tar_and_several_inputs(tmp_path):
    (tmp_path / "imgs").mkdir()
    for name in ("p.png", "q.png"):
        (tmp_path / "imgs" / name).write_bytes(name.encode())
    listing = tmp_path / "list.txt"
    listing.write_text("# images\nimgs/q.png\n\nimgs/p.png\nimgs/gone.png\n")
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in (
            ("000001.jpg", b"second"),
            ("000001.json", b"{}"),
            ("000000.jpg", b"first"),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    items = discover([listing, shard])
    assert [i.key for i in items] == [
        "00000.tar/000000.jpg",
        "00000.tar/000001.jpg",
        "list.txt/imgs/gone.png",
        "list.txt/imgs/p.png",
        "list.txt/imgs/q.png",
    ]
    with items[0].open() as fh, items[1].open() as gh:
        assert fh.read() == b"first" and gh.read() == b"second"
    with pytest.raises(ValueError, match="named"):
        discover([tmp_path / "imgs", tmp_path / "x" / "imgs"])
