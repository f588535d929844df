#!/usr/bin/env bash
# Shared set-up for quickstart.sh and test.sh: system OpenBLAS on Linux, a venv in .venv, and
# the package installed (editable) with the extras given as arguments (e.g. "test").
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }

apt_install() {
  command -v apt-get >/dev/null || return 0
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null ||
    { as_root apt-get update -q >/dev/null && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null; } ||
    echo "warning: could not install ${missing[*]} (no root?)" >&2
}

extras=()
if [ "$(uname -s)" = Linux ]; then
  apt_install libopenblas0-pthread
  extras+=(cpu)
fi
extras+=("$@")
# The test extra's real data: Fashion-MNIST from Debian, and Chromium to open search contact sheets
# headless (tests skip with a reason where either is absent).
for extra in "$@"; do
  if [ "$extra" = test ]; then apt_install dataset-fashion-mnist chromium; fi
done

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
spec="."
if [ ${#extras[@]} -gt 0 ]; then spec=".[$(IFS=,; echo "${extras[*]}")]"; fi
# cli/ and convert/ install as aimv2_mlx.cli and aimv2_mlx.convert, so setuptools' editable build
# uses a meta path finder and prints an information-only notice about it: not a warning to act on.
PYTHONWARNINGS="ignore:Editable installation" .venv/bin/python -m pip install -q -e "$spec"
