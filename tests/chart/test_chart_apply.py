"""The rendered chart applied with real kubectl to the operator tests' API emulator, then the
operator run as its Deployment says (same command line), reconciling the example study.

The emulator (tests/operator/fedop_support.py) gains the kinds the chart has and the operator
never touches: ServiceAccounts and RBAC. It cannot list namespaces (kmock 0.8), so the scenario
applied is `standalone`, which watches every namespace. `helm install` cannot talk to the
emulator (no OpenAPI, protobuf Secrets), hence `helm template | kubectl apply`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest
import yaml
from chart_support import KUBECTL, NAMESPACE, render_text
from fedop_support import EXAMPLES, VERBS, FedEmulator, wait_for
from kmock._internal import references

EXTRA: dict[str, tuple[str, bool]] = {
    "v1/serviceaccounts": ("ServiceAccount", True),
    "rbac.authorization.k8s.io/v1/roles": ("Role", True),
    "rbac.authorization.k8s.io/v1/rolebindings": ("RoleBinding", True),
    "rbac.authorization.k8s.io/v1/clusterroles": ("ClusterRole", False),
    "rbac.authorization.k8s.io/v1/clusterrolebindings": ("ClusterRoleBinding", False),
}
SCENARIO = "standalone"
EXAMPLE = EXAMPLES / "heart-disease.yaml"
STUDY = "heart-disease"


@attrs.define(kw_only=True)
class ChartEmulator(FedEmulator):
    """The operator tests' emulator, with the kinds the chart creates besides the operator's."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for key, (kind, namespaced) in EXTRA.items():
            self.resources[key] = references.ResourceInfo(
                kind=kind, namespaced=namespaced, singular=kind.lower(), verbs=VERBS
            )


pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.kmock(cls=ChartEmulator),
    pytest.mark.timeout(90),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def kubectl(kubeconfig: Path, home: Path, *args: str) -> str:
    if not os.access(KUBECTL, os.X_OK):
        pytest.fail(f"kubectl is missing at {KUBECTL}: run scripts/k8s-tools.sh")
    proc = await asyncio.create_subprocess_exec(
        str(KUBECTL),
        *args,
        env={**os.environ, "KUBECONFIG": str(kubeconfig), "HOME": str(home)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    if proc.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed:\n{err.decode()}")
    return out.decode()


async def test_the_rendered_chart_runs_the_operator(
    kmock: ChartEmulator, kubeconfig: Path, tmp_path: Path
) -> None:
    rendered = render_text(SCENARIO, "tests.enabled=false")
    crds = Path(__file__).resolve().parents[2] / "charts/fedstudy/crds"
    manifest = tmp_path / "chart.yaml"
    manifest.write_text(
        "\n---\n".join([*(p.read_text() for p in sorted(crds.glob("*.yaml"))), rendered])
    )

    async def k(*args: str) -> str:
        return await kubectl(kubeconfig, tmp_path, *args)

    # The chart, as `helm install` would create it (CRDs first).
    out = await k("apply", "--validate=false", "-f", str(manifest))
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    for doc in docs:
        assert f"{doc['metadata']['name']} created" in out, (doc["kind"], out)
    assert "federatedstudies.fedstudy.io created" in out

    deployments = json.loads(await k("get", "deployments", "-n", NAMESPACE, "-o", "json"))
    (deployment,) = deployments["items"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    binding = json.loads(await k("get", "clusterrolebindings", "-o", "json"))["items"][0]
    assert (
        binding["subjects"][0]["name"]
        == deployment["spec"]["template"]["spec"]["serviceAccountName"]
    )

    # The operator, with the container's command line; only its HTTP server moves to a free
    # loopback port (argparse: the last --metrics-port wins).
    assert container["command"] == ["fedstudy"]
    port = free_port()
    argv = [*container["args"], "--metrics-host", "127.0.0.1", "--metrics-port", str(port)]
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        elif var["valueFrom"].get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            env[var["name"]] = deployment["metadata"]["namespace"]
    env["HOME"] = str(tmp_path)
    log_path = tmp_path / "operator.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fedstudy", *argv, env=env, stdout=log, stderr=log
        )
        try:
            await _drive(k, kmock, port)
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 20) == 0
        except BaseException:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            print(log_path.read_text(errors="replace")[-8000:])
            raise


async def _drive(k: Any, kmock: ChartEmulator, port: int) -> None:
    import aiohttp

    async def healthy() -> bool:
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{port}/healthz") as r,
            ):
                return r.status == 200
        except aiohttp.ClientError:
            return False

    await wait_for(healthy, timeout=30, what="the operator's /healthz")
    out = await k("apply", "--validate=false", "-n", "research", "-f", str(EXAMPLE))
    assert f"federatedstudy.fedstudy.io/{STUDY} created" in out

    sites = [s["name"] for s in yaml.safe_load(EXAMPLE.read_text())["spec"]["sites"]]
    want = sorted(f"{STUDY}-trainer-{s}" for s in sites)

    async def jobs() -> bool:
        listing = json.loads(await k("get", "jobs", "-n", "research", "-o", "json"))
        return sorted(j["metadata"]["name"] for j in listing["items"]) == want

    await wait_for(jobs, timeout=40, what="one trainer Job per site")
    deployment = json.loads(
        await k("get", "deployment", f"{STUDY}-aggregator", "-n", "research", "-o", "json")
    )
    assert deployment["metadata"]["ownerReferences"][0]["kind"] == "FederatedStudy"
    names = json.loads(await k("get", "services", "-n", "research", "-o", "json"))["items"]
    assert f"{STUDY}-aggregator" in {s["metadata"]["name"] for s in names}

    async def has_status() -> bool:
        doc = json.loads(await k("get", "federatedstudy", STUDY, "-n", "research", "-o", "json"))
        return bool((doc.get("status") or {}).get("phase"))

    await wait_for(has_status, timeout=30, what="the study's status")
