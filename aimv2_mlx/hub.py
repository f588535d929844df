"""Is the Hugging Face hub reachable? Asked once, in at most two seconds, before any download.

huggingface-hub retries a refused or timed-out connection for ~24 s and logs every attempt; an
offline user should instead hear at once, in one line, what to do.
"""

from __future__ import annotations

import socket
import threading
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from huggingface_hub import constants

REACH_TIMEOUT_S = 2.0


def endpoint() -> str:
    """The hub's base URL as huggingface-hub uses it (HF_ENDPOINT or huggingface.co)."""
    return constants.ENDPOINT


def reachable(url: str, timeout: float = REACH_TIMEOUT_S) -> bool:
    """Whether a TCP connection to `url`'s host (or the proxy for it) opens within `timeout`.

    The connect runs in a daemon thread so that a stalled DNS lookup, which socket timeouts do
    not cover, cannot hold the caller longer than `timeout` either.
    """
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and host and not urllib.request.proxy_bypass(host):
        proxied = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxied.hostname, proxied.port or 80
    if not host:
        return False
    done, opened = threading.Event(), []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            opened.append(True)
        except OSError:
            pass
        done.set()

    threading.Thread(target=connect, daemon=True).start()
    done.wait(timeout)
    return bool(opened)


def upload(folder: Path, repo_id: str) -> str:
    """Create (if needed) the hub model repo and upload a model folder to it."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", exist_ok=True)
    api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="model",
        commit_message="Upload AIMv2 weights written by aimv2-mlx",
    )
    return repo_id
