#!/usr/bin/env bash
# Sets up .venv from a fresh clone: Python packages pinned by constraints.txt (torch 2.13.0,
# CPU build), fedstudy itself in editable mode with the trainer, dev and operator extras, and
# kubectl and helm in .tools/bin (scripts/k8s-tools.sh) for the operator's tests.
# Idempotent: a second run with unchanged pins returns at once.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=${PYTHON:-python3}
venv="$root/.venv"
stamp="$venv/.fedstudy-installed"
want=$(cat constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  scripts/k8s-tools.sh
  exit 0
fi
echo "setting up $venv ..."
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -c constraints.txt pip
# torch first and alone: with the pin it comes from the CPU wheel, never a CUDA build.
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -c constraints.txt torch
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -c constraints.txt \
  -e ".[trainer,dev,operator]"
echo "$want" > "$stamp"
scripts/k8s-tools.sh
echo "set up: $("$venv/bin/fedstudy" --version), torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
