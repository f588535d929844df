"""Run by tests/test_distributed.py under `mlx.launch -n 2` (and once alone): a tiny data-parallel
run.

usage: distributed_worker.py DATA OUT BATCH STEPS
"""

import sys

import aimv2_mlx  # noqa: F401  (OpenBLAS before MLX)
from aimv2_mlx.config import DecoderConfig, EncoderConfig
from aimv2_mlx.data.captioned import load_captioned
from aimv2_mlx.tokenizer import load_tokenizer
from aimv2_mlx.train.config import PretrainConfig
from aimv2_mlx.train.loop import pretrain

data, out, batch, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
tokenizer = load_tokenizer(f"{data}/tokenizer.json", 10)
config = PretrainConfig(
    encoder=EncoderConfig(32, 2, 2, 64, image_size=28),
    decoder=DecoderConfig(32, 1, 2, 64, tokenizer.vocab_size, 10),
    batch_size=batch,
    steps=steps,
    warmup_steps=2,
    log_every=1,
    compile=False,
)
pretrain(load_captioned(data), out, config, tokenizer, distributed=True, echo=lambda *_: None)
