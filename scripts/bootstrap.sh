#!/usr/bin/env bash
# Sets up .venv from a fresh clone: Python packages pinned by constraints.txt (torch 2.13.0,
# CPU build), fedstudy itself in editable mode with the trainer, dev, operator, report, imaging,
# export and boosting extras, kubectl and helm in .tools/bin (scripts/k8s-tools.sh) for the operator's
# tests, and the Debian package prometheus (prometheus and promtool) for the observability tests.
# Idempotent: a second run with unchanged pins returns at once.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing prometheus (Debian package) ..."
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus \
      >/dev/null
  else
    echo "bootstrap: prometheus and promtool are missing (apt-get install prometheus as root);" \
      "the observability tests need them" >&2
  fi
fi
py=${PYTHON:-python3}
venv="$root/.venv"
stamp="$venv/.fedstudy-installed"
checkov_version=3.3.30
# checkov, in its own venv and only when missing: its pins would fight ours in .venv.
if ! [ -x "$root/.venv-checkov/bin/checkov" ]; then
  echo "setting up .venv-checkov (checkov $checkov_version) ..."
  "$py" -m venv "$root/.venv-checkov"
  "$root/.venv-checkov/bin/python" -m pip install --quiet --disable-pip-version-check \
    "checkov==$checkov_version"
fi
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
  -e ".[trainer,dev,operator,report,imaging,export,boosting]"
echo "$want" > "$stamp"
scripts/k8s-tools.sh
echo "set up: $("$venv/bin/fedstudy" --version), torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
