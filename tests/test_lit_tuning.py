"""LiT-tuning: the loss against torch on transformers' towers, learning, exact resume and Ctrl-C,
the locked encoder, the learned CLIP BPE against OpenAI's, and export → load → zero-shot."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path

import aimv2_mlx
from aimv2_mlx.config import TextConfig
from aimv2_mlx.data.shapes import make_sample, write_shapes
from aimv2_mlx.lit_tuning import LitConfig, export_lit, lit_tune
from aimv2_mlx.lit_tuning.clip_bpe import train_clip_tokenizer
from aimv2_mlx.lit_tuning.loop import pair_indices
from aimv2_mlx.lit_tuning.step import LitStep
from aimv2_mlx.lit_tuning.towers import locked_weights
from aimv2_mlx.train.loop import TrainingInterrupted
from aimv2_mlx.train.optimizer import build_optimizer
from aimv2_mlx.zeroshot import ZeroShotClassifier

import mlx.core as mx
import numpy as np
import pytest

from .clip_bpe import reference_ids, write_vocab
from .conftest import one_line_error, run_cli, save_tiny_lit

STEPS = 12
COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]


def tiny(**overrides) -> LitConfig:
    values = dict(
        encoder="bundled",
        text=TextConfig(
            vocab_size=600,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=16,
        ),
        projection_dim=32,
        batch_size=8,
        steps=STEPS,
        warmup_steps=2,
        log_every=1,
        checkpoint_every=1000,
        compile=False,
    )
    return LitConfig(**{**values, **overrides})


def quiet(*_):
    pass


def trained(run: Path) -> dict[str, np.ndarray]:
    folder = sorted((run / "checkpoints").glob("step-*[0-9]"))[-1]
    out = {}
    for name in ("lit", "optimizer"):
        out.update(
            {
                f"{name}.{k}": np.array(v)
                for k, v in mx.load(str(folder / f"{name}.safetensors")).items()
            }
        )
    return out


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Shapes data and an uninterrupted run on it."""
    root = tmp_path_factory.mktemp("lit")
    data = write_shapes(root / "data", 40, size=56)
    record = lit_tune(data, root / "straight", tiny(), echo=quiet)
    return data, root / "straight", record


def test_the_loss_equals_torch_on_transformers_towers_with_the_same_weights(
    tmp_path, transformers_reference
):
    import torch
    import torch.nn.functional as F

    reference = save_tiny_lit(tmp_path, transformers_reference, vision_depth=1, logit_scale=2.0)
    model = aimv2_mlx.load(tmp_path)
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(6, 16, 64)).astype(np.float32)  # cached encoder tokens
    captions = [
        "a photo of a cat.",
        "a dog",
        "the red car",
        "coffee",
        "a rocket launched",
        "an astronaut",
    ]
    ids = aimv2_mlx.tokenizer.text_tokenizer(tmp_path).encode(captions, 16)

    with torch.no_grad():
        image = reference.visual_projection(reference.vision_model.head(torch.from_numpy(tokens)))
        ids_t = torch.from_numpy(ids.astype(np.int64))
        text = reference.text_projection(
            reference.text_model(
                input_ids=ids_t, attention_mask=torch.ones_like(ids_t)
            ).pooler_output
        )
        image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
        logits = reference.logit_scale.exp() * text @ image.T
        labels = torch.arange(6)
        expected = (
            (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        ).item()

    lit = dataclasses.replace(tiny(), compile=True)
    optimizer = build_optimizer(lit)
    optimizer.init(model.trainable_parameters())
    stats = LitStep(model, optimizer, lit)(tokens, ids)
    assert stats["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert abs(expected - np.log(6)) > 0.05  # the towers' weights matter to the number compared


def test_a_few_steps_lower_the_loss(straight):
    _, run, record = straight
    losses = [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(losses) == STEPS and record["step"] == STEPS
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.2, losses
    assert (run / "loss.png").stat().st_size > 1000


def test_resume_is_exact_after_ctrl_c(straight, tmp_path):
    data, run, _ = straight

    def interrupt_after_step_5(message):  # the signal lands while step 6 is the next in flight
        if message.startswith("step 5/"):
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted) as stop:
        lit_tune(data, tmp_path / "run", tiny(), echo=interrupt_after_step_5)
    assert stop.value.step == 6 and stop.value.checkpoint.name == "step-00000006"
    assert stop.value.exit_code == 130
    lit_tune(data, tmp_path / "run", resume=True, echo=quiet)
    resumed, uninterrupted = trained(tmp_path / "run"), trained(run)
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        np.testing.assert_array_equal(resumed[key], uninterrupted[key], err_msg=key)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))


def test_the_image_encoder_is_locked_and_its_features_come_from_the_embed_pipeline(
    straight, tmp_path
):
    data, run, _ = straight
    encoder = aimv2_mlx.load("bundled")
    checkpoint = trained(run)
    assert not [
        k
        for k in checkpoint
        if k.startswith(("lit.image_encoder.trunk.", "lit.image_encoder.preprocessor."))
    ]
    # the pooling head is trained
    assert any(k.startswith("lit.image_encoder.head.") for k in checkpoint)
    model = aimv2_mlx.load(export_lit(run, tmp_path / "lit"))
    exported = locked_weights(model)
    for key, value in locked_weights(encoder).items():
        np.testing.assert_array_equal(np.array(exported[key]), np.array(value), err_msg=key)
    images = sorted((data / "images").glob("*.png"))[:3]
    cached, table = aimv2_mlx.read_embeddings(run / "features")
    rows = {path: i for i, path in enumerate(table.column("path").to_pylist())}
    direct = aimv2_mlx.embed(images, encoder, pool="tokens")
    for image, tokens in zip(images, direct, strict=True):
        np.testing.assert_allclose(cached[rows[str(image.resolve())]], tokens, atol=1e-6)


def test_an_exported_run_loads_and_classifies_zero_shot_like_a_lit_folder(
    straight, tmp_path, transformers_reference
):
    data, run, _ = straight
    folder = export_lit(run, tmp_path / "lit")
    assert {p.name for p in folder.iterdir()} == {
        "config.json",
        "model.safetensors",
        "vocab.json",
        "merges.txt",
    }
    model = aimv2_mlx.load(folder)
    config = model.config
    assert (
        config.is_lit and config.source["origin"] == "aimv2 lit" and config.source["step"] == STEPS
    )
    images = sorted((data / "images").glob("*.png"))[:4]
    classifier = ZeroShotClassifier(model, COLORS, ["a {}"])
    ids = classifier.tokenizer.encode(
        [f"a {c}" for c in COLORS], config.text.max_position_embeddings
    )
    hf_ids = transformers_reference.CLIPTokenizerFast.from_pretrained(folder)(
        [f"a {c}" for c in COLORS],
        padding="max_length",
        max_length=config.text.max_position_embeddings,
    )
    # same BPE files
    np.testing.assert_array_equal(ids[ids != 0], np.array(hf_ids["input_ids"])[ids != 0])
    pixels = aimv2_mlx.preprocess(images, model)
    image = model.encode_image(pixels)
    text = model.encode_text(mx.array(ids))
    image, text = (np.array(x / mx.linalg.norm(x, axis=-1, keepdims=True)) for x in (image, text))
    logits = model.logit_scale().item() * image @ text.T
    expected = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(
        classifier(images), expected / expected.sum(1, keepdims=True), atol=1e-5
    )
    result = run_cli("classify", *images, "-m", folder, "--zero-shot", ",".join(COLORS), "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["results"]) == len(images)


def test_the_cli_exports_a_lit_run_and_refuses_a_second_run_in_its_folder(straight, tmp_path):
    data, run, _ = straight
    result = run_cli("export", run, tmp_path / "lit")
    assert result.exit_code == 0, result.output
    assert aimv2_mlx.load(tmp_path / "lit").config.is_lit
    one_line_error(run_cli("lit", data, "-o", run, "--steps", "2"), str(run), "--resume")
    one_line_error(
        run_cli("lit", data, "-o", run, "--resume", "--batch-size", "4"),
        "--batch-size",
        "config.json",
    )


def test_resuming_with_another_encoder_is_refused(straight, tmp_path):
    data, _, _ = straight
    lit_tune(data, tmp_path / "run", tiny(steps=2, warmup_steps=1), echo=quiet)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    config["encoder_identity"]["weights_sha256"] = "0" * 16
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not the encoder this run locked"):
        lit_tune(data, tmp_path / "run", resume=True, changes={"steps": 3}, echo=quiet)


def test_the_learned_clip_bpe_tokenizes_as_openai_clip_does(tmp_path):
    captions = [make_sample(0, i, 28)[1] for i in range(200)]
    tokenizer = train_clip_tokenizer(captions, tmp_path, vocab_size=560)
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    assert (
        len(vocab) <= 560
        and tokenizer.eos_id == len(vocab) - 1
        and tokenizer.bos_id == len(vocab) - 2
    )
    tricky = ["A LARGE Red circle, above: 3 squares!", "zebra émigré"]
    for text in [captions[0], captions[7], *tricky]:
        ids = tokenizer.encode([text], 40)[0]
        body = ids[1 : int((ids == tokenizer.eos_id).argmax())]
        assert body.tolist() == reference_ids(text, tmp_path), text
    # merges were learned
    assert len(tokenizer.token_ids(captions[0])) < len(captions[0].replace(" ", ""))


def test_two_ranks_see_what_one_process_with_twice_the_batch_sees():
    one = pair_indices(3, 50, 7, 8, world=1)
    two = np.concatenate([pair_indices(3, 50, 7, 4, world=2, rank=r) for r in (0, 1)])
    np.testing.assert_array_equal(one, two)
    assert len(set(pair_indices(3, 50, 0, 50).tolist())) == 50  # an epoch is a permutation


def test_two_launched_ranks_train_as_one_process_with_twice_the_batch(straight, tmp_path):
    import shutil
    import subprocess
    import sys

    launcher = Path(sys.executable).with_name("mlx.launch")
    if not launcher.exists() and shutil.which("mlx.launch") is None:
        pytest.skip("mlx.launch is not installed")
    data, _, _ = straight
    worker = str(Path(__file__).with_name("lit_distributed_worker.py"))
    launch = [
        str(launcher if launcher.exists() else shutil.which("mlx.launch")),
        "-n",
        "2",
        "--backend",
        "ring",
        "--python",
        sys.executable,
        worker,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    two = subprocess.run(
        launch + [str(data), str(tmp_path / "two"), "4", "4"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert two.returncode == 0, two.stdout + two.stderr
    one = subprocess.run(
        [sys.executable, worker, str(data), str(tmp_path / "one"), "8", "4"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert one.returncode == 0, one.stderr
    logs = [
        [json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
        for run in ("two", "one")
    ]
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]] == [1, 2, 3, 4]
    for a, b in zip(*logs, strict=True):
        for key in ("loss", "grad_norm", "logit_scale"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), (a["step"], key)
    w_two, w_one = trained(tmp_path / "two"), trained(tmp_path / "one")
    assert w_two.keys() == w_one.keys()
    for key in w_one:
        np.testing.assert_allclose(w_two[key], w_one[key], rtol=1e-4, atol=1e-6, err_msg=key)


def test_the_bundled_model_classifies_colours_zero_shot_offline_without_a_model(tmp_path):
    import subprocess
    import sys

    from aimv2_mlx.data.shapes import read_labels

    data = write_shapes(tmp_path / "shapes", 30, size=56, seed=11)  # images no tower has seen
    paths, labels = read_labels(data)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "aimv2_mlx.cli",
            "classify",
            str(data / "images"),
            "--zero-shot",
            ",".join(COLORS),
            "--json",
            "--top-k",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "bundled" in result.stderr  # the one-line notice of the offline fallback
    top = {
        Path(r["image"]).name: r["top"][0]["label"] for r in json.loads(result.stdout)["results"]
    }
    truth = {Path(p).name: COLORS[i] for p, i in zip(paths, labels["color"], strict=True)}
    accuracy = np.mean([top[name] == truth[name] for name in truth])
    assert accuracy >= 0.6, accuracy  # chance is 1/6


def test_aimv2_info_shows_the_bundled_text_towers_data_steps_and_scores():
    folder = Path(aimv2_mlx.model.BUNDLED_DIR)
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 20e6
    lit = json.loads((folder / "config.json").read_text())["source"]["lit"]
    result = run_cli("info", "bundled")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "LiT (image + text)" in text and f"LiT-tuned {lit['step']} steps" in text
    assert f"color {lit['zero_shot_scores']['color']['zero_shot']:.1f}" in text
    assert "recall@5" in text


def test_a_given_tokenizer_is_used_and_an_undecodable_image_is_left_out_and_listed(tmp_path):
    data = write_shapes(tmp_path / "data", 20, size=56)
    (data / "images" / "000003.png").write_bytes(b"not a png")
    vocab = write_vocab(tmp_path / "tok")
    lit_tune(
        data,
        tmp_path / "run",
        tiny(steps=2, warmup_steps=1),
        tokenizer=tmp_path / "tok",
        echo=quiet,
    )
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (
        config["text"]["vocab_size"] == len(vocab)
        and config["text"]["eos_token_id"] == len(vocab) - 1
    )
    assert (tmp_path / "run" / "tokenizer" / "merges.txt").read_bytes() == (
        tmp_path / "tok" / "merges.txt"
    ).read_bytes()
    failures = (tmp_path / "run" / "features" / "failures.jsonl").read_text().splitlines()
    assert len(failures) == 1 and "000003.png" in failures[0]


@pytest.mark.parametrize(
    "args, needles",
    [
        (["MISSING", "-o", "RUN"], ["MISSING", "no such folder"]),
        (["DATA", "-o", "RUN", "--vocab-size", "100"], ["--vocab-size 100", "514"]),
        (["DATA", "-o", "RUN", "-b", "1"], ["--batch-size 1"]),
        (["DATA", "-o", "RUN", "--encoder", "no/such-model-dir/"], ["no/such-model-dir"]),
    ],
)
def test_the_lit_command_refuses_bad_input_in_one_line(straight, tmp_path, args, needles):
    data, _, _ = straight
    names = {"MISSING": str(tmp_path / "missing"), "RUN": str(tmp_path / "run"), "DATA": str(data)}
    args = [names.get(arg, arg) for arg in args]
    one_line_error(
        run_cli("lit", *args, "--steps", "2", "--no-compile"), *[names.get(n, n) for n in needles]
    )


def test_exporting_a_run_without_a_checkpoint_is_one_line(straight, tmp_path):
    data, _, _ = straight
    with pytest.raises(TrainingInterrupted):
        lit_tune(
            data,
            tmp_path / "run",
            tiny(),
            echo=lambda m: os.kill(os.getpid(), signal.SIGINT) if m.startswith("step 1/") else None,
        )
    for folder in (tmp_path / "run" / "checkpoints").iterdir():
        if folder.is_dir():
            # a damaged checkpoint: nothing complete to export
            (folder / "lit.safetensors").unlink()
    one_line_error(run_cli("export", tmp_path / "run", tmp_path / "out"), "no complete checkpoint")


def test_aimv2_info_on_a_lit_run_says_how_to_export_it(straight):
    _, run, _ = straight
    one_line_error(run_cli("info", run), str(run), "LiT-tuning run", f"aimv2 export {run} OUT")
