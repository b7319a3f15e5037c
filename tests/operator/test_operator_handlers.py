"""The operator's handlers against kmock's KubernetesEmulator, kopf in the same event loop.

The emulator runs no controllers: the tests play the parts of the Deployment and Job
controllers (setting their status) and of the aggregator (its /status answers).
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
import yaml
from fedop_support import CRD_FILE, FedEmulator, study, wait_for
from fedstudy_operator import main
from fedstudy_operator.handlers import OperatorApp
from fedstudy_operator.options import OperatorConfig

pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.kmock(cls=FedEmulator),
    pytest.mark.timeout(60),
    pytest.mark.usefixtures("kubeconfig"),
]

NS = "default"
STUDIES = f"/apis/fedstudy.io/v1alpha1/namespaces/{NS}/federatedstudies"
JOBS = "batch/v1/jobs"
TODAY = dt.date(2027, 1, 15)


class FakeAggregators:
    """Answers the operator's /status reads as the aggregators would."""

    def __init__(self) -> None:
        self.answers: dict[str, Any] = {}

    def set(self, study: str, doc: dict[str, Any] | None) -> None:
        self.answers[f"http://{study}-aggregator.{NS}.svc:8080/status"] = doc

    async def __call__(self, url: str) -> Any:
        return copy.deepcopy(self.answers.get(url))


class Clock:
    def __init__(self, today: dt.date) -> None:
        self.today = today

    def __call__(self) -> dt.date:
        return self.today


@pytest.fixture
def aggregators() -> FakeAggregators:
    return FakeAggregators()


@pytest.fixture
def clock() -> Clock:
    return Clock(TODAY)


async def api(
    kmock: FedEmulator, method: str, path: str, body: Any = None, merge: bool = True
) -> Any:
    headers = (
        {"Content-Type": "application/merge-patch+json"} if method == "PATCH" and merge else {}
    )
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, str(kmock.url).rstrip("/") + path, json=body, headers=headers) as r,
    ):
        data = await r.json(content_type=None)
        assert r.status < 400, (method, path, r.status, data)
        return data


async def install_crd(kmock: FedEmulator) -> None:
    crd = yaml.safe_load(CRD_FILE.read_text())
    await api(kmock, "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)


@asynccontextmanager
async def operator(
    aggregators: FakeAggregators, clock: Clock, **config: Any
) -> AsyncIterator[OperatorApp]:
    cfg = OperatorConfig(**{"resync_seconds": 0.3, **config})
    app = OperatorApp(cfg, probe=aggregators, today=clock)
    stop = asyncio.Event()
    task = asyncio.create_task(main.run(cfg, app=app, metrics_port=0, stop_flag=stop))
    try:
        yield app
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


def the_study(kmock: FedEmulator, name: str = "heart") -> dict[str, Any]:
    obj = kmock.get("fedstudy.io/v1alpha1/federatedstudies", NS, name)
    assert obj is not None
    return obj


def condition(kmock: FedEmulator, kind: str, name: str = "heart") -> dict[str, Any]:
    for c in (the_study(kmock, name).get("status") or {}).get("conditions") or []:
        if c["type"] == kind:
            return dict(c)
    return {}


def phase(kmock: FedEmulator, name: str = "heart") -> str | None:
    obj = kmock.get("fedstudy.io/v1alpha1/federatedstudies", NS, name)
    return ((obj or {}).get("status") or {}).get("phase")


def children(kmock: FedEmulator) -> dict[str, dict[str, Any]]:
    out = {}
    for res in (
        "v1/configmaps",
        "v1/services",
        "v1/persistentvolumeclaims",
        "apps/v1/deployments",
        JOBS,
        "networking.k8s.io/v1/networkpolicies",
    ):
        for obj in kmock.live(res, NS):
            out[f"{obj['kind']}/{obj['metadata']['name']}"] = obj
    return out


def events(kmock: FedEmulator) -> list[dict[str, Any]]:
    return kmock.live("v1/events", NS)


async def set_job(kmock: FedEmulator, name: str, outcome: str) -> None:
    status = {
        "succeeded": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]},
        "failed": {
            "failed": 7,
            "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}],
        },
        "active": {"active": 1},
    }[outcome]
    await api(
        kmock, "PATCH", f"/apis/batch/v1/namespaces/{NS}/jobs/{name}/status", {"status": status}
    )


async def aggregator_ready(kmock: FedEmulator, study: str = "heart") -> None:
    await api(
        kmock,
        "PATCH",
        f"/apis/apps/v1/namespaces/{NS}/deployments/{study}-aggregator/status",
        {"status": {"replicas": 1, "readyReplicas": 1, "availableReplicas": 1}},
    )


EXPECTED_CHILDREN = {
    "ConfigMap/heart-study",
    "PersistentVolumeClaim/heart-aggregator-state",
    "Service/heart-aggregator",
    "NetworkPolicy/heart-aggregator",
    "Deployment/heart-aggregator",
    "NetworkPolicy/heart-trainer",
    "PersistentVolumeClaim/heart-state-site0",
    "Job/heart-trainer-site0",
    "PersistentVolumeClaim/heart-state-site1",
    "Job/heart-trainer-site1",
}


async def test_create_makes_every_child_owned_by_the_study(
    kmock: FedEmulator, aggregators: FakeAggregators, clock: Clock
) -> None:
    await install_crd(kmock)
    async with operator(aggregators, clock):
        await api(kmock, "POST", STUDIES, study(sites=2))
        await wait_for(lambda: set(children(kmock)) == EXPECTED_CHILDREN, what="children")
        await wait_for(lambda: phase(kmock) == "Pending", what="phase Pending")
        uid = the_study(kmock)["metadata"]["uid"]
        for key, obj in children(kmock).items():
            refs = obj["metadata"]["ownerReferences"]
            assert [(r["uid"], r["kind"], r["controller"]) for r in refs] == [
                (uid, "FederatedStudy", True)
            ], key
        status = the_study(kmock)["status"]
        assert status["observedGeneration"] == 1
        assert status["round"] == "?/3"
        assert status["sites"] == "?/2"
        assert status["epsilon"] == ""
        assert status["trainers"] == {"site0": "Pending", "site1": "Pending"}
        ready = condition(kmock, "Ready")
        assert (ready["status"], ready["reason"]) == ("False", "AggregatorNotReady")
        assert condition(kmock, "Blocked")["status"] == "False"
        assert condition(kmock, "Progressing")["status"] == "True"


async def test_status_follows_the_aggregator_and_the_jobs_to_success(
    kmock: FedEmulator, aggregators: FakeAggregators, clock: Clock
) -> None:
    await install_crd(kmock)
    async with operator(aggregators, clock):
        await api(kmock, "POST", STUDIES, study(sites=2))
        await wait_for(lambda: phase(kmock) == "Pending", what="Pending")
        ready_since = condition(kmock, "Ready")["lastTransitionTime"]

        await aggregator_ready(kmock)
        aggregators.set(
            "heart",
            {
                "state": "training",
                "completed_rounds": 1,
                "planned_rounds": 3,
                "joined": ["site0", "site1"],
                "sites": {"site0": {"epsilon": 0.5}, "site1": {"epsilon": 0.75}},
            },
        )
        await set_job(kmock, "heart-trainer-site0", "active")
        await wait_for(lambda: phase(kmock) == "Running", what="Running")
        await wait_for(lambda: the_study(kmock)["status"].get("round") == "1/3", what="round")
        status = the_study(kmock)["status"]
        assert status["sites"] == "2/2"
        assert status["epsilon"] == "0.75"
        assert status["aggregator"]["reachable"] is True
        ready = condition(kmock, "Ready")
        assert (ready["status"], ready["reason"]) == ("True", "AggregatorReady")
        assert ready["lastTransitionTime"] >= ready_since
        progressing = condition(kmock, "Progressing")
        assert (progressing["reason"], progressing["message"]) == ("Training", "round 2 of 3")
        since = progressing["lastTransitionTime"]

        # Trainers done but the aggregator has not said so: not yet Succeeded.
        await set_job(kmock, "heart-trainer-site0", "succeeded")
        await set_job(kmock, "heart-trainer-site1", "succeeded")
        aggregators.set(
            "heart",
            {
                "state": "finishing",
                "completed_rounds": 3,
                "planned_rounds": 3,
                "joined": ["site0", "site1"],
            },
        )
        await wait_for(
            lambda: condition(kmock, "Progressing").get("reason") == "Finishing", what="Finishing"
        )
        assert phase(kmock) == "Running"
        # Same status (True), new reason: the transition time is kept.
        assert condition(kmock, "Progressing")["lastTransitionTime"] == since

        aggregators.set(
            "heart",
            {
                "state": "done",
                "completed_rounds": 3,
                "planned_rounds": 3,
                "joined": ["site0", "site1"],
            },
        )
        await wait_for(lambda: phase(kmock) == "Succeeded", what="Succeeded")
        assert condition(kmock, "Succeeded")["status"] == "True"
        assert condition(kmock, "Succeeded")["reason"] == "StudyCompleted"
        assert condition(kmock, "Progressing")["status"] == "False"
        assert condition(kmock, "Failed")["status"] == "False"
        assert the_study(kmock)["status"]["round"] == "3/3"
        # The aggregator exits once the study is over: the operator scales it down.
        await wait_for(
            lambda: children(kmock)["Deployment/heart-aggregator"]["spec"]["replicas"] == 0,
            what="the finished aggregator scaled to 0",
        )
        assert phase(kmock) == "Succeeded"
        await wait_for(
            lambda: any(e.get("reason") == "StudyCompleted" for e in events(kmock)),
            what="a StudyCompleted event",
        )


async def test_a_job_that_exhausts_its_retries_fails_the_study(
    kmock: FedEmulator, aggregators: FakeAggregators, clock: Clock
) -> None:
    await install_crd(kmock)
    async with operator(aggregators, clock):
        await api(kmock, "POST", STUDIES, study(sites=2))
        await wait_for(lambda: "Job/heart-trainer-site1" in children(kmock), what="jobs")
        await aggregator_ready(kmock)
        await set_job(kmock, "heart-trainer-site1", "failed")
        await wait_for(lambda: phase(kmock) == "Failed", what="Failed")
        failed = condition(kmock, "Failed")
        assert (failed["status"], failed["reason"]) == ("True", "TrainerFailed")
        assert "site1" in failed["message"]
        assert the_study(kmock)["status"]["trainers"]["site1"] == "Failed"
        await wait_for(
            lambda: any(
                e.get("reason") == "TrainerFailed" and e.get("type") == "Warning"
                for e in events(kmock)
            ),
            what="a TrainerFailed warning",
        )


async def test_a_restarted_operator_creates_no_duplicates(
    kmock: FedEmulator, aggregators: FakeAggregators, clock: Clock
) -> None:
    await install_crd(kmock)
    async with operator(aggregators, clock):
        await api(kmock, "POST", STUDIES, study(sites=2))
        await wait_for(lambda: set(children(kmock)) == EXPECTED_CHILDREN, what="children")
        await wait_for(lambda: phase(kmock) == "Pending", what="status")
    before = children(kmock)
    # As if the first operator died half-way: one Job never got made.
    await api(kmock, "DELETE", f"/apis/batch/v1/namespaces/{NS}/jobs/heart-trainer-site1")
    posts_before = len(kmock["post"])

    async with operator(aggregators, clock) as app:
        await wait_for(lambda: "Job/heart-trainer-site1" in children(kmock), what="the Job")
        # Let the resume handler and several timer rounds run.
        await asyncio.sleep(1.5)
        assert app.config.role == "standalone"
    after = children(kmock)
    assert set(after) == set(before)
    creates = [r for r in list(kmock["post"])[posts_before:] if "/events" not in str(r.url.path)]
    assert [str(r.url.path).rsplit("/", 1)[-1] for r in creates] == ["jobs"]
    for key in before:
        if key != "Job/heart-trainer-site1":
            assert after[key]["metadata"]["uid"] == before[key]["metadata"]["uid"], key


async def test_an_invalid_spec_is_a_condition_not_a_crash_loop(
    kmock: FedEmulator, aggregators: FakeAggregators, clock: Clock
) -> None:
    await install_crd(kmock)
    doc = study(sites=2)
    doc["spec"]["rounds"] = 0
    doc["spec"]["sites"][1]["data"]["format"] = "xls"
    doc["spec"]["sites"][0]["colour"] = "red"
    async with operator(aggregators, clock):
        await api(kmock, "POST", STUDIES, doc)
        await wait_for(lambda: phase(kmock) == "Invalid", what="Invalid")
        ready = condition(kmock, "Ready")
        assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
        lines = ready["message"].splitlines()
        assert any(line.startswith("spec.rounds: ") for line in lines), lines
        assert any(line.startswith("spec.sites[1].data.format: ") for line in lines), lines
        assert any(line.startswith("spec.sites[0].colour: unknown field") for line in lines)
        assert children(kmock) == {}
        await wait_for(
            lambda: any(e.get("reason") == "InvalidSpec" for e in events(kmock)),
            what="an InvalidSpec event",
        )
        patches = len(kmock["patch"])
        await asyncio.sleep(1.0)
        # No retry storm: the status is written once, the timer finds nothing new to write.
        status_patches = [
            r for r in list(kmock["patch"])[patches:] if r.url.path.endswith("/status")
        ]
        assert status_patches == []

        # Fixing the spec brings the study up.
        fixed = study(sites=2)
        await api(kmock, "PATCH", f"{STUDIES}/heart", {"spec": fixed["spec"]})
        await wait_for(lambda: set(children(kmock)) == EXPECTED_CHILDREN, what="children")
        await wait_for(lambda: phase(kmock) == "Pending", what="Pending")
        assert the_study(kmock)["status"]["observedGeneration"] == 2


async def test_an_expired_irb_blocks_the_study_and_a_renewal_releases_it(
    kmock: FedEmulator, aggregators: FakeAggregators, clock: Clock
) -> None:
    await install_crd(kmock)
    async with operator(aggregators, clock):
        await api(kmock, "POST", STUDIES, study(sites=2, irb_until="2027-06-30"))
        await wait_for(lambda: set(children(kmock)) == EXPECTED_CHILDREN, what="children")
        await wait_for(lambda: phase(kmock) == "Pending", what="status")
        blocked = condition(kmock, "Blocked")
        assert (blocked["status"], blocked["reason"]) == ("False", "IRBApproved")
        assert "IRB-2026-0142" in blocked["message"]

        # Time passes: the timer notices the lapse and pauses everything.
        clock.today = dt.date(2027, 7, 1)
        await wait_for(lambda: phase(kmock) == "Blocked", what="Blocked")
        blocked = condition(kmock, "Blocked")
        assert (blocked["status"], blocked["reason"]) == ("True", "IRBApprovalExpired")
        assert "IRB-2026-0142" in blocked["message"]
        assert "2027-06-30" in blocked["message"]
        assert condition(kmock, "Ready")["reason"] == "IRBApprovalExpired"
        kids = children(kmock)
        assert kids["Deployment/heart-aggregator"]["spec"]["replicas"] == 0
        assert kids["Job/heart-trainer-site0"]["spec"]["suspend"] is True
        assert kids["Job/heart-trainer-site1"]["spec"]["suspend"] is True
        await wait_for(
            lambda: any(
                e.get("reason") == "IRBApprovalExpired" and e.get("type") == "Warning"
                for e in events(kmock)
            ),
            what="an IRBApprovalExpired warning",
        )

        # The approval is renewed: workloads resume.
        await api(
            kmock,
            "PATCH",
            f"{STUDIES}/heart",
            {"spec": {"governance": {"irb": {"approvedUntil": "2028-06-30"}}}},
        )
        await wait_for(lambda: phase(kmock) == "Pending", what="unblocked")
        kids = children(kmock)
        assert kids["Deployment/heart-aggregator"]["spec"]["replicas"] == 1
        assert kids["Job/heart-trainer-site0"]["spec"]["suspend"] is False


async def test_a_study_created_after_its_irb_expired_never_starts(
    kmock: FedEmulator, aggregators: FakeAggregators, clock: Clock
) -> None:
    await install_crd(kmock)
    async with operator(aggregators, clock):
        await api(kmock, "POST", STUDIES, study(sites=1, irb_until="2026-12-31"))
        await wait_for(lambda: phase(kmock) == "Blocked", what="Blocked")
        kids = children(kmock)
        assert kids["Deployment/heart-aggregator"]["spec"]["replicas"] == 0
        assert kids["Job/heart-trainer-site0"]["spec"]["suspend"] is True


async def test_spec_changes_add_and_remove_jobs_and_roll_the_aggregator(
    kmock: FedEmulator, aggregators: FakeAggregators, clock: Clock
) -> None:
    await install_crd(kmock)
    async with operator(aggregators, clock):
        await api(kmock, "POST", STUDIES, study(sites=2))
        await wait_for(lambda: set(children(kmock)) == EXPECTED_CHILDREN, what="children")
        dep = children(kmock)["Deployment/heart-aggregator"]
        old_hash = dep["spec"]["template"]["metadata"]["annotations"]["fedstudy.io/config-hash"]

        # A third site joins, the first leaves.
        new = study(sites=3)
        new["spec"]["sites"] = new["spec"]["sites"][1:]
        await api(kmock, "PATCH", f"{STUDIES}/heart", {"spec": {"sites": new["spec"]["sites"]}})
        await wait_for(
            lambda: (
                sorted(k for k in children(kmock) if k.startswith("Job/"))
                == ["Job/heart-trainer-site1", "Job/heart-trainer-site2"]
            ),
            what="jobs of site1 and site2",
        )
        await wait_for(
            lambda: set(the_study(kmock)["status"].get("trainers", {})) == {"site1", "site2"},
            what="trainers in status",
        )
        # The departed site's state (its privacy ledger) stays until the study is deleted.
        assert "PersistentVolumeClaim/heart-state-site0" in children(kmock)

        # Any other change rolls the aggregator: its pod template carries the config hash.
        await api(kmock, "PATCH", f"{STUDIES}/heart", {"spec": {"rounds": 9}})

        def rolled() -> bool:
            kids = children(kmock)
            d = kids["Deployment/heart-aggregator"]["spec"]["template"]["metadata"]
            return (
                d["annotations"]["fedstudy.io/config-hash"] != old_hash
                and "rounds: 9" in kids["ConfigMap/heart-study"]["data"]["study.yaml"]
            )

        await wait_for(rolled, what="the aggregator rolled")


async def test_deleting_the_study_deletes_its_children(
    kmock: FedEmulator, aggregators: FakeAggregators, clock: Clock
) -> None:
    await install_crd(kmock)
    async with operator(aggregators, clock):
        await api(kmock, "POST", STUDIES, study(sites=2))
        await wait_for(lambda: set(children(kmock)) == EXPECTED_CHILDREN, what="children")
        await wait_for(lambda: the_study(kmock)["metadata"].get("finalizers"), what="finalizer")
        await api(kmock, "DELETE", f"{STUDIES}/heart")
        await wait_for(
            lambda: kmock.get("fedstudy.io/v1alpha1/federatedstudies", NS, "heart") is None,
            what="the study gone (finalizer released)",
        )
        await wait_for(lambda: children(kmock) == {}, what="children collected")


@pytest.mark.parametrize("role", ["coordinator", "site"])
async def test_roles(
    kmock: FedEmulator, aggregators: FakeAggregators, clock: Clock, role: str
) -> None:
    await install_crd(kmock)
    annotations = {
        "fedstudy.io/aggregator-address": "fl.example.org:7700",
        "fedstudy.io/aggregator-service-type": "LoadBalancer",
    }
    config: dict[str, Any] = {"role": role}
    if role == "site":
        config["site_name"] = "site1"
    async with operator(aggregators, clock, **config):
        await api(kmock, "POST", STUDIES, study(sites=2, annotations=annotations))
        if role == "coordinator":
            want = {
                "ConfigMap/heart-study",
                "PersistentVolumeClaim/heart-aggregator-state",
                "Service/heart-aggregator",
                "Service/heart-aggregator-external",
                "NetworkPolicy/heart-aggregator",
                "Deployment/heart-aggregator",
            }
        else:
            want = {
                "ConfigMap/heart-study",
                "NetworkPolicy/heart-trainer",
                "PersistentVolumeClaim/heart-state-site1",
                "Job/heart-trainer-site1",
            }
        await wait_for(lambda: set(children(kmock)) == want, what=f"{role} children")
        if role == "site":
            job = children(kmock)["Job/heart-trainer-site1"]
            args = job["spec"]["template"]["spec"]["containers"][0]["args"]
            assert args[args.index("--aggregator") + 1] == "fl.example.org:7700"
            await set_job(kmock, "heart-trainer-site1", "succeeded")
            await wait_for(lambda: phase(kmock) == "Succeeded", what="site Succeeded")
            assert the_study(kmock)["status"]["sites"] == "?/2"
        else:
            await aggregator_ready(kmock)
            aggregators.set(
                "heart", {"state": "done", "completed_rounds": 3, "planned_rounds": 3, "joined": []}
            )
            await wait_for(lambda: phase(kmock) == "Succeeded", what="coordinator Succeeded")


async def test_a_site_cluster_whose_site_is_not_in_the_study_makes_nothing(
    kmock: FedEmulator, aggregators: FakeAggregators, clock: Clock
) -> None:
    await install_crd(kmock)
    annotations = {"fedstudy.io/aggregator-address": "fl.example.org:7700"}
    async with operator(aggregators, clock, role="site", site_name="elsewhere"):
        await api(kmock, "POST", STUDIES, study(sites=2, annotations=annotations))
        await wait_for(
            lambda: condition(kmock, "Ready").get("reason") == "SiteNotInStudy", what="condition"
        )
        assert children(kmock) == {}
        assert "elsewhere" in condition(kmock, "Ready")["message"]
