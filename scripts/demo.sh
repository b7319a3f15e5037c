#!/usr/bin/env bash
# From a fresh clone: set everything up, then run the demo study (breast cancer data split
# across four simulated hospitals) on this machine.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/bootstrap.sh"
exec "$root/.venv/bin/fedstudy" run "$root/examples/breast-cancer.yaml" --out "$root/fedstudy-out/breast-cancer" "$@"
