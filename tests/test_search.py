"""`aimv2 search` and `aimv2 dupes`: exact top-k against NumPy brute force, text search through a
tiny random LiT against transformers' `Aimv2Model`, and contact sheets opened in headless Chromium.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
from pathlib import Path

import aimv2_mlx
from aimv2_mlx.dupes import find_duplicates
from aimv2_mlx.index import open_index, update_index
from aimv2_mlx.search import exact_top_k, search

import numpy as np
import pytest
from PIL import Image

from .conftest import one_line_error, run_cli, save_tiny_lit, tiny_config
from .test_index import make_folder, write_png

PHOTOS = Path(__file__).resolve().parents[1] / "examples" / "photos"
CONTEXT = 16


@pytest.fixture(scope="module")
def shapes_index(tmp_path_factory):
    """(photos folder, index folder) of 40 tiny images embedded by a tiny encoder with no text
    tower, saved beside them in `encoder/` (the bundled model is a LiT)."""
    root = tmp_path_factory.mktemp("search")
    make_folder(root / "photos", 40, per_folder=10)
    encoder = aimv2_mlx.save(aimv2_mlx.build(tiny_config()), root / "encoder")
    update_index(root / "photos", root / "index", aimv2_mlx.load(encoder))
    return root / "photos", root / "index"


def brute_force(vectors: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    scores = vectors.astype(np.float64) @ query.astype(np.float64)
    return np.argsort(-scores, kind="stable")[:k]


@pytest.mark.parametrize("dtype,simd", [("float32", False), ("float16", False), ("float16", True)])
def test_exact_top_k_equals_numpy_brute_force(rng, dtype, simd, monkeypatch):
    import aimv2_mlx.search as search_module

    if simd:
        pytest.importorskip("usearch", reason="float16 SIMD brute force comes with the ann extra")
    else:
        monkeypatch.setattr(search_module, "_simd_brute_force", lambda: None)
    vectors = rng.standard_normal((5000, 64)).astype(dtype)
    for _ in range(5):
        query = rng.standard_normal(64).astype(np.float32)
        rows, scores = exact_top_k(vectors, query, 20)
        expected = brute_force(vectors, query, 20)
        assert rows.tolist() == expected.tolist()
        assert np.abs(scores - vectors[expected].astype(np.float64) @ query).max() <= 1e-3
    rows, _ = exact_top_k(vectors[:7], query, 20)  # k past the end: every row, best first
    assert rows.tolist() == brute_force(vectors[:7], query, 7).tolist()


def test_search_by_example_ranks_the_index_as_numpy_does(shapes_index):
    photos, folder = shapes_index
    index = open_index(folder)
    model = aimv2_mlx.load(folder.parent / "encoder")
    example = photos / "f01" / "img0012.png"
    query = aimv2_mlx.embed([example], model, normalize=True)[0]
    results = search(index, image=example, k=10, model=model)
    expected = brute_force(np.asarray(index.vectors), query, 10)
    assert [r.path for r in results] == [index.paths[i] for i in expected]
    assert results[0].path == str(example) and results[0].score == pytest.approx(1.0, abs=1e-5)
    assert all(a.score >= b.score for a, b in itertools.pairwise(results))


def test_cli_search_json_shape_and_text_on_an_encoder_without_a_text_tower(shapes_index):
    photos, folder = shapes_index
    result = run_cli(
        "search", "--index", folder, "--image", photos / "f00" / "img0003.png", "-k", "5", "--json"
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert list(out) == ["results"] and len(out["results"]) == 5
    assert all(list(r) == ["path", "score"] for r in out["results"])
    assert out["results"][0]["path"] == str(photos / "f00" / "img0003.png")
    one_line_error(
        run_cli("search", "a red circle", "--index", folder), "has no text tower", "--image"
    )
    one_line_error(
        run_cli("search", "--index", folder, "--image", photos / "missing.png"), "missing.png"
    )
    one_line_error(run_cli("search", "--index", folder), "give a text query, an --image, or both")
    one_line_error(
        run_cli("search", "--index", folder, "--image", photos / "f00" / "img0003.png", "-k", "0"),
        "-k 0",
    )


def test_search_with_another_model_is_refused(shapes_index, tmp_path):
    _, folder = shapes_index
    one_line_error(
        run_cli("search", "--index", folder, "--image", PHOTOS / "rocket.jpg", "-m", "bundled"),
        "indexed with tiny-test",
    )


@pytest.fixture(scope="module")
def lit(tmp_path_factory):
    """(model folder, transformers reference and tokenizer, index folder, files): a tiny LiT."""
    pytest.importorskip(
        "torch", reason="LiT search parity needs the test extra: pip install -e '.[test]'"
    )
    transformers = pytest.importorskip(
        "transformers", reason="LiT search parity needs transformers>=5"
    )

    root = tmp_path_factory.mktemp("lit-search")
    reference = save_tiny_lit(root / "model", transformers, context=CONTEXT)
    photos = root / "photos"
    photos.mkdir()
    for photo in PHOTOS.glob("*.jpg"):
        shutil.copy(photo, photos / photo.name)
    make_folder(photos / "generated", 12, per_folder=12)
    update_index(photos, root / "index", aimv2_mlx.load(root / "model"))
    files = sorted(str(p) for p in photos.rglob("*") if p.suffix in (".jpg", ".png"))
    return (
        root / "model",
        reference,
        transformers.CLIPTokenizer.from_pretrained(root / "model"),
        root / "index",
        files,
    )


@pytest.mark.parametrize("text", ["a photo of a cat", "the rocket launched", "coffee"])
def test_text_search_through_a_tiny_lit_equals_transformers_ranking(lit, text):
    import torch

    model_folder, reference, tokenizer, folder, files = lit
    index = open_index(folder)
    assert index.paths == files
    model = aimv2_mlx.load(model_folder)
    pixels = aimv2_mlx.preprocess(files, model)
    ids = tokenizer(
        [text], padding="max_length", truncation=True, max_length=CONTEXT, return_tensors="pt"
    )
    with torch.inference_mode():
        out = reference(
            input_ids=ids["input_ids"],
            pixel_values=torch.from_numpy(np.array(pixels)).permute(0, 3, 1, 2),
            attention_mask=torch.ones_like(ids["input_ids"]),
        )  # makes the text tower causal
    similarity = (out.text_embeds @ out.image_embeds.T)[0].numpy()
    expected = np.argsort(-similarity, kind="stable")[:10]
    assert similarity.std() > 0.05  # a wrong order would show

    results = search(folder, text=text, k=10)  # the index loads its own model and tokenizer
    assert [r.path for r in results] == [files[i] for i in expected]
    assert np.abs(np.array([r.score for r in results]) - similarity[expected]).max() <= 1e-4


def test_a_mixed_query_is_the_normalised_sum_of_text_and_image(lit):
    model_folder, _, _, folder, files = lit
    index = open_index(folder)
    model = aimv2_mlx.load(model_folder)
    from aimv2_mlx.search import text_vector

    text = text_vector(model, "a cat")
    image = aimv2_mlx.embed([files[0]], model, pool="head", normalize=True)[0]
    query = (text + image) / np.linalg.norm(text + image)
    results = search(index, text="a cat", image=files[0], k=len(files), model=model)
    expected = brute_force(np.asarray(index.vectors), query, len(files))
    assert [r.path for r in results] == [files[i] for i in expected]
    assert [r.path for r in results] != [
        r.path for r in search(index, text="a cat", k=len(files), model=model)
    ]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("no headless Chromium (Debian's chromium, installed by scripts/setup.sh test)")


def _open_in_chromium(page: Path, tmp_path: Path) -> tuple[int, np.ndarray]:
    """(images that loaded, screenshot pixels) of `page` in headless Chromium."""
    browser = _chromium()
    probe = tmp_path / "probe.html"  # the page plus a script that counts the images that decoded
    probe.write_text(
        page.read_text().replace(
            "</body>",
            "<script>window.addEventListener('load', () => "
            "{document.title = 'loaded:' + [...document.images].filter(i => i.complete && "
            "i.naturalWidth > 0).length;});</script></body>",
        )
    )
    common = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000",
    ]
    dom = subprocess.run(
        common + ["--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120
    )
    loaded = re.search(r"<title>loaded:(\d+)</title>", dom.stdout)
    assert loaded, dom.stderr[-2000:]
    shot = tmp_path / "shot.png"
    subprocess.run(
        common + [f"--screenshot={shot}", "--window-size=1000,800", page.as_uri()],
        capture_output=True,
        timeout=120,
    )
    return int(loaded[1]), np.asarray(Image.open(shot).convert("RGB"))


def test_search_html_opens_in_chromium_with_k_thumbnails(shapes_index, tmp_path):
    photos, folder = shapes_index
    page = tmp_path / "sheet.html"
    result = run_cli(
        "search",
        "--index",
        folder,
        "--image",
        photos / "f00" / "img0001.png",
        "-k",
        "7",
        "--html",
        page,
    )
    assert result.exit_code == 0, result.output
    # self-contained
    assert page.read_text().count("<img ") == 7 and "file://" not in page.read_text()
    loaded, screenshot = _open_in_chromium(page, tmp_path)
    assert loaded == 7
    # not blank
    assert screenshot.std() > 10 and len(np.unique(screenshot.reshape(-1, 3), axis=0)) > 50


def test_dupes_groups_equal_connected_components_of_the_brute_force_similarity(tmp_path, rng):
    photos = tmp_path / "photos"
    originals = make_folder(photos, 12, per_folder=12)
    for i, original in enumerate(originals[:4]):  # 4 groups: an exact copy, and for two a near copy
        shutil.copy(original, photos / f"copy{i}.png")
        if i < 2:
            pixels = np.asarray(Image.open(original)).astype(int)
            Image.fromarray(np.clip(pixels + 3, 0, 255).astype(np.uint8)).save(
                photos / f"near{i}.png"
            )
    write_png(photos / "odd.png", 999)
    update_index(photos, tmp_path / "index", aimv2_mlx.load("bundled"))
    index = open_index(tmp_path / "index")
    vectors = np.asarray(index.vectors, np.float64)
    threshold = 0.999
    linked = vectors @ vectors.T >= threshold
    components, seen = [], set()
    for start in range(len(vectors)):  # graph search over the brute-force links
        if start in seen:
            continue
        stack, component = [start], set()
        while stack:
            node = stack.pop()
            if node not in component:
                component.add(node)
                stack += np.nonzero(linked[node])[0].tolist()
        seen |= component
        if len(component) > 1:
            components.append(sorted(component))
    groups = find_duplicates(index, threshold)
    assert len(groups) >= 4
    assert sorted([r.row for r in g] for g in groups) == sorted(components)
    assert [len(g) for g in groups] == sorted((len(g) for g in groups), reverse=True)
    result = run_cli("dupes", "--index", tmp_path / "index", "--threshold", threshold, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert [[r["path"] for r in g] for g in out["groups"]] == [[r.path for r in g] for g in groups]
    assert all(g[0]["score"] == pytest.approx(1.0, abs=1e-5) for g in out["groups"])


def test_the_ann_extra_finds_the_exact_top_10_and_its_graph_follows_the_index(
    shapes_index, tmp_path, rng
):
    pytest.importorskip("usearch", reason="the ann extra: pip install 'aimv2-mlx[ann]'")
    from aimv2_mlx.ann import build_graph, graph_search

    vectors = rng.standard_normal((3000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    graph = build_graph(vectors)
    queries = rng.standard_normal((50, 32)).astype(np.float32)
    found = [
        set(graph_search(graph, vectors, q, 10)[0].tolist())
        & set(brute_force(vectors, q, 10).tolist())
        for q in queries
    ]
    assert np.mean([len(f) for f in found]) / 10 >= 0.95

    photos = tmp_path / "photos"
    make_folder(photos, 30, per_folder=30)
    update_index(photos, tmp_path / "index", aimv2_mlx.load("bundled"))
    example = photos / "f00" / "img0004.png"
    result = run_cli(
        "search", "--index", tmp_path / "index", "--image", example, "-k", "3", "--ann", "--json"
    )
    assert result.exit_code == 0, result.output
    exact = run_cli(
        "search", "--index", tmp_path / "index", "--image", example, "-k", "3", "--json"
    )
    assert json.loads(result.stdout) == json.loads(exact.stdout)
    assert [p.name for p in (tmp_path / "index").glob("ann-*")] == ["ann-1.usearch"]
    write_png(photos / "f00" / "extra.png", 77)
    update_index(photos, tmp_path / "index", aimv2_mlx.load("bundled"))
    assert not list((tmp_path / "index").glob("ann-*"))  # the old generation's graph went with it


def test_ann_without_its_extra_says_how_to_install_it(shapes_index, monkeypatch):
    import builtins

    photos, folder = shapes_index
    real_import = builtins.__import__

    def no_usearch(name, *args, **kwargs):
        if name.startswith("usearch"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_usearch)
    example = photos / "f00" / "img0002.png"
    one_line_error(
        run_cli("search", "--index", folder, "--image", example, "--ann"), "aimv2-mlx[ann]"
    )
