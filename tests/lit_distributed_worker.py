"""Run by tests/test_lit_tuning.py under `mlx.launch -n 2` (and once alone): a tiny data-parallel
LiT run. usage: lit_distributed_worker.py DATA OUT BATCH STEPS"""

import sys

import aimv2_mlx  # noqa: F401  (OpenBLAS before MLX)
from aimv2_mlx.config import TextConfig
from aimv2_mlx.lit_tuning import LitConfig, lit_tune

data, out, batch, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
config = LitConfig(
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
    batch_size=batch,
    steps=steps,
    warmup_steps=1,
    log_every=1,
    compile=False,
)
lit_tune(data, out, config, distributed=True, echo=lambda *_: None)
