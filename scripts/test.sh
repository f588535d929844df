#!/usr/bin/env bash
# Install the package with its test extras, check formatting and lint (ruff, configured in
# pyproject.toml), then run the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/ruff format --check --quiet .
.venv/bin/ruff check --quiet .
.venv/bin/python -m pytest -q "$@"
