#!/usr/bin/env bash
# The test command: set up, lint, type-check, check the import contract, run every test.
# Extra arguments go to pytest (e.g. scripts/test.sh -k spec).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/bootstrap.sh
# Flower in a venv of its own, for the smoke run of the side-by-side benchmarks.
bench/setup-flower.sh
export PATH="$root/.venv/bin:$PATH"
echo "== ruff"
ruff check .
ruff format --check .
echo "== mypy (strict)"
mypy
echo "== import contract"
lint-imports
echo "== pytest"
pytest "$@"
