"""Offline: an unreachable hub is found out within two seconds and said in one line with the fix.

The hub is an HF_ENDPOINT at a closed localhost port (connections refused), never the network.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from aimv2_mlx import hub
from aimv2_mlx.model import HubUnreachableError, resolve

import huggingface_hub.constants
import pytest

PHOTOS = Path(__file__).resolve().parents[1] / "examples" / "photos"


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _offline_aimv2(tmp_path: Path, *args) -> tuple[subprocess.CompletedProcess, float]:
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    env.update(
        HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}",
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_CACHE=str(tmp_path / "hf" / "hub"),
    )
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "aimv2_mlx.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    return result, time.perf_counter() - started


def test_a_refused_connection_is_unreachable_at_once():
    started = time.perf_counter()
    assert not hub.reachable(f"http://127.0.0.1:{_closed_port()}")
    assert time.perf_counter() - started < 1.0


def test_a_listening_endpoint_is_reachable():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert hub.reachable(f"http://127.0.0.1:{server.getsockname()[1]}")


def test_a_stalled_lookup_is_given_up_after_the_timeout(monkeypatch):
    def stalled(*args, **kwargs):
        time.sleep(1.0)
        raise OSError("lookup timed out")

    monkeypatch.setattr(socket, "create_connection", stalled)
    started = time.perf_counter()
    assert not hub.reachable("https://huggingface.co", timeout=0.3)
    assert time.perf_counter() - started < 0.8


def test_resolving_a_hub_id_gives_up_on_a_stalled_hub_within_two_seconds(tmp_path, monkeypatch):
    def stalled(*args, **kwargs):  # a firewall that drops packets, or a DNS lookup that hangs
        time.sleep(5)
        raise OSError("timed out")

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", stalled)
    started = time.perf_counter()
    with pytest.raises(HubUnreachableError, match="HF_HUB_OFFLINE=1"):
        resolve("apple/aimv2-large-patch14-224")
    assert time.perf_counter() - started < hub.REACH_TIMEOUT_S + 0.5


@pytest.mark.parametrize(
    "args, fix",
    [
        (("info", "apple/aimv2-large-patch14-224"), "-m bundled"),
        (
            (
                "classify",
                str(PHOTOS),
                "--zero-shot",
                "cat,dog",
                "-m",
                "apple/aimv2-large-patch14-224-lit",
            ),
            "-m a local LiT folder",
        ),
    ],
)
def test_offline_hub_models_fail_fast_in_one_line_naming_the_fix(tmp_path, args, fix):
    result, seconds = _offline_aimv2(tmp_path, *args)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: apple/aimv2-large-patch14-224"), (
        result.stderr
    )
    assert fix in lines[0] and "HF_HUB_OFFLINE=1" in lines[0]
    assert seconds < 10  # huggingface-hub alone retries for ~24 s


@pytest.mark.parametrize(
    "args", [("embed", "-o", "VECTORS"), ("classify", "--zero-shot", "cat,dog")]
)
def test_offline_default_model_falls_back_to_bundled_fast_in_one_line(tmp_path, args):
    args = [str(tmp_path / "vectors") if arg == "VECTORS" else arg for arg in args]
    result, seconds = _offline_aimv2(tmp_path, args[0], str(PHOTOS), *args[1:])
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if "embedding" not in line]
    assert len(notes) == 1 and "bundled" in notes[0] and "HF_HUB_OFFLINE=1" in notes[0], (
        result.stderr
    )
    assert seconds < 10
