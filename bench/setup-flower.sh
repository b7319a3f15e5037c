#!/usr/bin/env bash
# Makes .venv-flower: Flower 1.42 (simulation extra, with Ray) for the side-by-side benchmarks.
# Flower needs protobuf 6 and fedstudy protobuf 7, hence a venv of its own. Versions are pinned
# by bench/flower-constraints.txt; torch 2.13.0 is the CPU build, as in .venv.
# Idempotent: returns at once when the venv already matches the pins.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv-flower"
pins="$root/bench/flower-constraints.txt"
stamp="$venv/.pins"
py=${PYTHON:-python3}
want=$(sha256sum "$pins" | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setting up $venv ..."
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check -c "$pins")
# torch first and alone: with the pin it is the CPU build, never a CUDA one.
"${pip[@]}" torch
"${pip[@]}" "flwr[simulation]" pandas scikit-learn opacus pyyaml pydantic
echo "$want" > "$stamp"
echo "set up: flwr $("$venv/bin/python" -c 'import flwr; print(flwr.__version__)')"
