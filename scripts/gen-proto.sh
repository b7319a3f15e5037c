#!/usr/bin/env bash
# Regenerates the Python stubs of the wire protocol from proto/ into DEST
# (default: the repository). tests/test_wire.py fails when the checked-in stubs drift.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-$root}
py=${PYTHON:-python}
bindir=$(dirname "$(command -v "$py")")
mkdir -p "$dest"
"$py" -m grpc_tools.protoc -I "$root/proto" \
  --python_out="$dest" --grpc_python_out="$dest" \
  --plugin=protoc-gen-mypy="$bindir/protoc-gen-mypy" --mypy_out="$dest" \
  --plugin=protoc-gen-mypy_grpc="$bindir/protoc-gen-mypy_grpc" --mypy_grpc_out="$dest" \
  "$root"/proto/fedstudy/wire/*.proto
