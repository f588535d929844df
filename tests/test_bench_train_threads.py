"""bench/train_threads.py: the per-thread summary of perf samples counts what it says."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture
def threads(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # the bench imports its sibling host.py
    spec = importlib.util.spec_from_file_location("bench_train_threads", BENCH / "train_threads.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_samples_are_summarised_per_thread_and_per_bin(threads):
    per_bin = int(threads.FREQUENCY * threads.BIN)  # a thread busy for a whole bin
    rows = []
    for b in range(4):  # bins 0-1: both streams busy; 2-3: only thread "a"
        t = b * threads.BIN + threads.BIN / 2
        rows += [("a", t, "sgemm_kernel_HASWELL")] * per_bin
        if b < 2:
            rows += [("b", t, "mlx::core::copy")] * per_bin
    rows += [("c", 0.01, "Compiled_kernel")] * 3
    report = threads.summarise(rows, seconds=4 * threads.BIN, cores=2)
    assert report["samples"] == len(rows)
    assert report["bins"] == {"both_streams_busy": 2, "one_busy": 2, "neither": 0}
    assert report["threads"][0] == {"share": 4 * per_bin / len(rows), "gemm_share_of_thread": 1.0}
    assert report["threads"][1]["gemm_share_of_thread"] == 0.0
    assert report["gemm_share"] == pytest.approx(4 * per_bin / len(rows))
    assert report["utilisation"] == pytest.approx(
        len(rows) / (4 * threads.BIN * threads.FREQUENCY * 2)
    )
