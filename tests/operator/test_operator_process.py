"""The operator as a process (``fedstudy operator``), driven by real kubectl, against the emulator.

kubectl comes from scripts/k8s-tools.sh (run by scripts/bootstrap.sh) into .tools/bin. The
emulator does no server-side printing, so printer columns are checked on the CRD object.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import yaml
from aiohttp import web
from fedop_support import CRD_FILE, EXAMPLES, ROOT, FedEmulator, wait_for

pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.kmock(cls=FedEmulator),
    pytest.mark.timeout(90),
]

KUBECTL = ROOT / ".tools" / "bin" / "kubectl"
EXAMPLE = EXAMPLES / "heart-disease.yaml"
STUDY = "heart-disease"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def kubectl_bin() -> Path:
    if not os.access(KUBECTL, os.X_OK):
        pytest.fail(
            f"kubectl is missing at {KUBECTL}: run scripts/k8s-tools.sh "
            "(scripts/bootstrap.sh runs it)"
        )
    return KUBECTL


class Kubectl:
    def __init__(self, binary: Path, kubeconfig: Path, home: Path) -> None:
        self.binary = binary
        self.env = {**os.environ, "KUBECONFIG": str(kubeconfig), "HOME": str(home)}

    async def __call__(self, *args: str, check: bool = True) -> str:
        proc = await asyncio.create_subprocess_exec(
            str(self.binary),
            *args,
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{err.decode()}")
        return out.decode()

    async def json(self, *args: str) -> Any:
        return json.loads(await self(*args, "-o", "json"))


@pytest.fixture
def kubectl(kubectl_bin: Path, kubeconfig: Path, tmp_path: Path) -> Kubectl:
    return Kubectl(kubectl_bin, kubeconfig, tmp_path)


class FakeAggregator:
    """The aggregator's HTTP /status, on loopback."""

    def __init__(self) -> None:
        self.answer: dict[str, Any] | None = None

    async def status(self, request: web.Request) -> web.Response:
        if self.answer is None:
            return web.Response(status=503)
        return web.json_response(self.answer)


@pytest_asyncio.fixture
async def aggregator() -> AsyncIterator[tuple[FakeAggregator, int]]:
    fake = FakeAggregator()
    app = web.Application()
    app.router.add_get("/{namespace}/{study}/status", fake.status)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield fake, port
    finally:
        await runner.cleanup()


async def test_the_operator_process_with_kubectl(
    kmock: FedEmulator,
    kubectl: Kubectl,
    kubeconfig: Path,
    aggregator: tuple[FakeAggregator, int],
    tmp_path: Path,
) -> None:
    fake, agg_port = aggregator
    metrics_port = free_port()
    log_path = tmp_path / "operator.log"
    log = log_path.open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fedstudy",
        "operator",
        "--role",
        "standalone",
        "--all-namespaces",
        "--metrics-host",
        "127.0.0.1",
        "--metrics-port",
        str(metrics_port),
        "--resync-seconds",
        "0.5",
        "--aggregator-status-url",
        f"http://127.0.0.1:{agg_port}/{{namespace}}/{{study}}/status",
        "--log-format",
        "plain",
        env={**os.environ, "KUBECONFIG": str(kubeconfig)},
        stdout=log,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        await _drive(kmock, kubectl, fake, metrics_port)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        print(log_path.read_text(errors="replace")[-8000:])
        raise
    finally:
        log.close()


async def _drive(kmock: FedEmulator, kubectl: Kubectl, fake: FakeAggregator, port: int) -> None:
    metrics_url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:

        async def get(path: str) -> tuple[int, str]:
            try:
                async with session.get(metrics_url + path) as r:
                    return r.status, await r.text()
            except aiohttp.ClientError:
                return 0, ""

        await wait_for(lambda: _ok(get("/healthz")), timeout=20, what="the operator's /healthz")

        # The CRD and the example study, as a user would apply them.
        out = await kubectl("apply", "--validate=false", "-f", str(CRD_FILE))
        assert "federatedstudies.fedstudy.io created" in out
        out = await kubectl("apply", "--validate=false", "-f", str(EXAMPLE))
        assert f"federatedstudy.fedstudy.io/{STUDY} created" in out

        async def job_names() -> list[str]:
            jobs = await kubectl.json("get", "jobs")
            return sorted(j["metadata"]["name"] for j in jobs["items"])

        sites = [s["name"] for s in yaml.safe_load(EXAMPLE.read_text())["spec"]["sites"]]
        want_jobs = sorted(f"{STUDY}-trainer-{s}" for s in sites)
        await wait_for(
            lambda: _eq(job_names(), want_jobs), timeout=30, what="one trainer Job per site"
        )
        deployments = await kubectl.json("get", "deployments")
        (dep,) = deployments["items"]
        assert dep["metadata"]["name"] == f"{STUDY}-aggregator"
        assert dep["metadata"]["ownerReferences"][0]["kind"] == "FederatedStudy"

        listing = await kubectl("get", "federatedstudies")
        assert listing.split()[:2] == ["NAME", "AGE"]  # no server-side printing here
        assert STUDY in listing
        assert STUDY in await kubectl("get", "fstudy", "-o", "name")

        # Printer columns: on the CRD object itself.
        names = await kubectl(
            "get",
            "crd",
            "federatedstudies.fedstudy.io",
            "-o",
            "jsonpath={.spec.versions[0].additionalPrinterColumns[*].name}",
        )
        assert names.split() == ["Phase", "Round", "Sites", "Epsilon", "Age"]

        blocked = dt.date.today() > dt.date(2027, 6, 30)  # the example's IRB approval
        if not blocked:
            await kubectl(
                "patch",
                "deployment",
                f"{STUDY}-aggregator",
                "--subresource=status",
                "--type=merge",
                "-p",
                '{"status": {"replicas": 1, "readyReplicas": 1}}',
            )
            fake.answer = {
                "state": "training",
                "completed_rounds": 4,
                "planned_rounds": 15,
                "joined": sites,
                "sites": {},
            }

        async def study_status() -> dict[str, Any]:
            doc = await kubectl.json("get", "federatedstudy", STUDY)
            status: dict[str, Any] = doc.get("status") or {}
            return status

        want_phase = "Blocked" if blocked else "Running"
        status = await wait_for(
            lambda: _where(study_status(), lambda s: s.get("phase") == want_phase),
            timeout=30,
            what=f"phase {want_phase}",
        )
        if not blocked:
            status = await wait_for(
                lambda: _where(study_status(), lambda s: s.get("round") == "4/15"),
                timeout=30,
                what="round 4/15 from the aggregator's /status",
            )
            assert status["sites"] == f"{len(sites)}/{len(sites)}"
        types = {c["type"]: c["status"] for c in status["conditions"]}
        assert set(types) == {"Ready", "Progressing", "Succeeded", "Failed", "Blocked"}

        code, text = await get("/metrics")
        assert code == 200
        assert 'fedstudy_operator_reconciles_total{result="ok"}' in text
        assert "fedstudy_operator_reconcile_duration_seconds_bucket" in text
        assert "fedstudy_operator_reconcile_errors_total" in text

        # kubectl delete: the operator releases its finalizer, the children go with the study.
        await kubectl("delete", "-f", str(EXAMPLE), "--wait=false")
        await wait_for(
            lambda: _eq(kubectl("get", "federatedstudies", "-o", "name"), ""),
            timeout=30,
            what="the study deleted",
        )
        await wait_for(lambda: _eq(job_names(), []), timeout=30, what="the Jobs deleted")
        assert (await kubectl.json("get", "deployments"))["items"] == []
        assert (await kubectl.json("get", "configmaps"))["items"] == []


async def _ok(coro: Any) -> bool:
    code, _ = await coro
    return bool(code == 200)


async def _eq(coro: Any, want: Any) -> bool:
    got = await coro
    return bool((got.strip() if isinstance(got, str) else got) == want)


async def _where(coro: Any, pred: Any) -> Any:
    got = await coro
    return got if pred(got) else None
