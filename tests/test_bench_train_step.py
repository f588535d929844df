"""bench/train_step.py: its PyTorch reference takes exactly our pre-training step, and the check
that says so fails when the reference differs (each side in its own process, as the bench runs)."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
ARGS = argparse.Namespace(threads=2, warmup=0, steps=1, plain=False)


@pytest.fixture
def train_step(monkeypatch):
    pytest.importorskip(
        "torch", reason="the reference needs the test extra: pip install -e '.[test]'"
    )
    # the bench imports its siblings (host, pretrain_throughput)
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_train_step", BENCH / "train_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_pytorch_reference_takes_the_same_step_as_ours(train_step, tmp_path):
    figures = train_step.run_check(tmp_path, ARGS, "tiny", batch=2, depth=1)
    assert train_step.failures(figures) == []
    assert figures["relative"]["loss"] <= 1e-4 and figures["weights_max_relative"] <= 1e-4


@pytest.mark.parametrize("field, value", [("weight_decay", 0.0), ("pixel_weight", 0.5)])
def test_a_reference_that_differs_from_our_step_is_caught(train_step, tmp_path, field, value):
    spec, _ = train_step._spec_file(tmp_path, ARGS, "tiny", 2, 1, 0)
    wrong = tmp_path / "wrong-spec.json"
    wrong.write_text(json.dumps({**spec, field: value}))
    figures = train_step.run_check(tmp_path, ARGS, "tiny", batch=2, depth=1, spec_path=wrong)
    assert train_step.failures(figures)
