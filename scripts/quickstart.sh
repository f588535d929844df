#!/usr/bin/env bash
# Install everything (OpenBLAS on Linux, .venv, the package) and embed the sample photos.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/aimv2 embed examples/photos -o embeddings
