#!/usr/bin/env bash
# Install everything (OpenBLAS on Linux, .venv, the package), embed the sample photos, then search
# generated shapes by text, offline, with the bundled LiT toy.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/aimv2 embed examples/photos -o embeddings
[ -d shapes ] || .venv/bin/aimv2 data shapes shapes --n 200 --size 56 --seed 1
.venv/bin/aimv2 index shapes -o shapes-index -m bundled
.venv/bin/aimv2 search "a large red circle" --index shapes-index -k 5
