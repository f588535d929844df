"""Shared fixtures. References (torch, transformers) are imported lazily, per test."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import aimv2_mlx  # noqa: F401  (OpenBLAS before MLX)
from aimv2_mlx.config import EncoderConfig, ModelConfig, PreprocessConfig

import numpy as np
import pytest

from .clip_bpe import write_vocab


def tiny_config(native: bool = False, head: bool = False, depth: int = 2) -> ModelConfig:
    """A small encoder config for logic tests (2 blocks, 64 wide, 2 heads)."""
    return ModelConfig(
        name="tiny-test",
        vision=EncoderConfig(
            hidden_size=64,
            num_hidden_layers=depth,
            num_attention_heads=2,
            intermediate_size=128,
            image_size=56,
            is_native=native,
            use_head=head,
        ),
        preprocess=PreprocessConfig.for_mode("native" if native else "clip", 56),
    )


def save_tiny_lit(
    folder: Path,
    transformers,
    seed: int = 0,
    context: int = 16,
    vision_depth: int = 2,
    logit_scale: float | None = None,
):
    """A random tiny transformers `Aimv2Model` (eager attention, eval mode) saved in `folder`
    with a CLIP BPE vocabulary (`vocab.json` + `merges.txt`), as Apple's LiT ships; returns it.
    `logit_scale` sets a non-default scale, so that a wrong one would show."""
    import torch

    vocab = write_vocab(folder)
    torch.manual_seed(seed)
    tower = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2)
    config = transformers.Aimv2Config(
        vision_config=dict(tower, num_hidden_layers=vision_depth, image_size=56, use_head=True),
        text_config=dict(
            tower,
            num_hidden_layers=2,
            vocab_size=len(vocab),
            max_position_embeddings=context,
            eos_token_id=len(vocab) - 1,
        ),
        projection_dim=32,
    )
    reference = transformers.Aimv2Model._from_config(config, attn_implementation="eager").eval()
    if logit_scale is not None:
        with torch.no_grad():
            reference.logit_scale.fill_(logit_scale)
    reference.save_pretrained(folder)
    return reference


def png_bomb(path: Path, side: int = 20_000) -> None:
    """A valid 1-bit PNG of side x side zeros (~50 KB on disk, 400 megapixels decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    packer = zlib.compressobj(9)
    row = bytes(1 + side // 8)
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


def timm_key(ml_aim_key: str) -> str:
    """An ml-aim key rewritten by hand into timm's `aimv2_*` name, not by our key map."""
    return (
        ml_aim_key.replace("preprocessor.patchifier.proj", "patch_embed.proj")
        .replace("preprocessor.patchifier.norm", "patch_embed.norm")
        .replace("preprocessor.pos_embed", "pos_embed")
        .replace("trunk.post_trunk_norm", "norm")
        .replace("trunk.blocks", "blocks")
        .replace("norm_1", "norm1")
        .replace("norm_2", "norm2")
        .replace("mlp.fc1.", "mlp.fc1_g.")
        .replace("mlp.fc3.", "mlp.fc1_x.")
    )


def run_cli(*args):
    """`aimv2 ARGS` in this process, through the click command the console script runs."""
    from aimv2_mlx.cli.app import command

    from click.testing import CliRunner

    return CliRunner().invoke(command(), [str(a) for a in args])


def one_line_error(result, *needles: str) -> str:
    """The single stderr line of a refused command, which must name each of `needles`."""
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert "Traceback" not in result.output and not isinstance(result.exception, Exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def transformers_reference():
    """transformers + torch, or a skip that says why."""
    pytest.importorskip(
        "torch", reason="parity tests need the test extra: pip install -e '.[test]'"
    )
    return pytest.importorskip(
        "transformers", reason="parity tests need transformers>=5 (test extra)"
    )


@pytest.fixture(autouse=True)
def cpu_settings_restored():
    """Whatever a test's `load()` or training run tuned process-wide is put back after it."""
    from aimv2_mlx.cpu import settings

    yield
    settings.restore()
