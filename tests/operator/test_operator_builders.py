"""The pure builders: every manifest valid for Kubernetes 1.30 and the newest known version."""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest
from fedop_support import example, study
from fedstudy_operator import builders
from fedstudy_operator.options import OperatorConfig, parse_options

from fedstudy.spec import parse_study

K8S_VERSIONS = ["1.30", kubernetes_validate.latest_version()]
UID = "0b6f6a3e-1f5e-4b7a-9a53-3c1f1c0c0a01"


def with_server_fields(doc: dict[str, Any], namespace: str = "research") -> dict[str, Any]:
    body = copy.deepcopy(doc)
    meta = body["metadata"]
    meta["namespace"] = namespace
    meta.update(uid=UID, generation=1, resourceVersion="7")
    return body


def plan_for(
    doc: dict[str, Any], config: OperatorConfig, *, blocked: bool = False
) -> builders.Plan:
    body = with_server_fields(doc)
    s = parse_study({k: body[k] for k in ("apiVersion", "kind", "metadata", "spec")})
    options, problems = parse_options(
        body["metadata"].get("annotations", {}), config, [x.name for x in s.spec.sites]
    )
    assert problems == []
    return builders.build_children(body, s, options, config, blocked=blocked)


SITE_ADDRESS = {"fedstudy.io/aggregator-address": "fl.hospital-network.example:7700"}
SCENARIOS: dict[str, tuple[dict[str, Any], OperatorConfig]] = {
    "standalone-1-site": (study(sites=1), OperatorConfig(role="standalone")),
    "standalone-4-sites-gpu": (study(sites=4, gpu=1), OperatorConfig(role="standalone")),
    "standalone-builtin-data": (study(sites=4, data="builtin"), OperatorConfig()),
    "coordinator-clusterip": (study(sites=4), OperatorConfig(role="coordinator")),
    "coordinator-loadbalancer": (
        study(
            sites=4,
            annotations={
                "fedstudy.io/aggregator-service-type": "LoadBalancer",
                "fedstudy.io/grpc-ingress-cidrs": "192.0.2.0/24, 198.51.100.7/32",
                "fedstudy.io/monitoring-namespace": "monitoring",
            },
        ),
        OperatorConfig(role="coordinator", operator_namespace="fedstudy-system"),
    ),
    "coordinator-nodeport": (
        study(sites=1, annotations={"fedstudy.io/aggregator-service-type": "NodePort"}),
        OperatorConfig(role="coordinator"),
    ),
    "site-gpu": (
        study(sites=4, gpu=2, annotations=SITE_ADDRESS),
        OperatorConfig(role="site", site_name="site2"),
    ),
    "site-scheduling-and-storage": (
        study(
            sites=1,
            gpu=1,
            annotations={
                **SITE_ADDRESS,
                "fedstudy.io/aggregator-cidrs": "203.0.113.10/32",
                "fedstudy.io/node-selector": '{"nvidia.com/gpu.present": "true"}',
                "fedstudy.io/tolerations": '[{"key": "nvidia.com/gpu", "operator": "Exists", '
                '"effect": "NoSchedule"}]',
                "fedstudy.io/priority-class": "research-batch",
                "fedstudy.io/storage-size": "5Gi",
                "fedstudy.io/storage-class": "fast-ssd",
                "fedstudy.io/data-pvc-site0": "cleveland-records",
                "fedstudy.io/image": "registry.example/fedstudy:1.2.3",
            },
        ),
        OperatorConfig(role="site", site_name="site0"),
    ),
    "standalone-hostpath": (
        study(sites=2, annotations={"fedstudy.io/data-hostpath-site1": "/srv/data/site1"}),
        OperatorConfig(),
    ),
    "heart-disease-example": (example("heart-disease"), OperatorConfig()),
    "breast-cancer-example": (example("breast-cancer"), OperatorConfig(role="coordinator")),
}


def pod_specs(children: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c["spec"]["template"]["spec"] for c in children if c["kind"] in ("Deployment", "Job")]


def by_kind(children: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [c for c in children if c["kind"] == kind]


@pytest.mark.parametrize("blocked", [False, True], ids=["running", "blocked"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_every_manifest_is_valid_kubernetes(scenario: str, blocked: bool) -> None:
    doc, config = SCENARIOS[scenario]
    plan = plan_for(doc, config, blocked=blocked)
    assert plan.children
    for child in plan.children:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(child, version, strict=True)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_children_are_owned_named_and_labelled(scenario: str) -> None:
    doc, config = SCENARIOS[scenario]
    plan = plan_for(doc, config)
    name = doc["metadata"]["name"]
    keys = [(c["kind"], c["metadata"]["name"]) for c in plan.children]
    assert len(keys) == len(set(keys)), "two children share a kind and name"
    for child in plan.children:
        meta = child["metadata"]
        assert meta["namespace"] == "research"
        assert len(meta["name"]) <= 63
        assert meta["name"].startswith(name)
        (ref,) = meta["ownerReferences"]
        assert ref == {
            "apiVersion": "fedstudy.io/v1alpha1",
            "kind": "FederatedStudy",
            "name": name,
            "uid": UID,
            "controller": True,
            "blockOwnerDeletion": True,
        }
        assert meta["labels"]["fedstudy.io/study"] == name
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "fedstudy-operator"
        assert builders.APPLIED_HASH in meta["annotations"]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_every_pod_meets_the_restricted_pod_security_standard(scenario: str) -> None:
    doc, config = SCENARIOS[scenario]
    plan = plan_for(doc, config)
    for pod in pod_specs(plan.children):
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] is True
        assert sc["runAsUser"] == 10001
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        for c in pod["containers"]:
            csc = c["securityContext"]
            assert csc["allowPrivilegeEscalation"] is False
            assert csc["capabilities"] == {"drop": ["ALL"]}
            assert csc["readOnlyRootFilesystem"] is True
            assert csc["runAsNonRoot"] is True
            assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
            assert "ports" not in c or all("hostPort" not in p for p in c["ports"])
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["tmp"] == {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}
        host_paths = [v for v in pod["volumes"] if "hostPath" in v]
        # Host paths are the one documented exception (opt-in for development clusters).
        assert not host_paths or scenario == "standalone-hostpath"
        assert "hostNetwork" not in pod
        assert "hostPID" not in pod


def test_roles_decide_what_is_built() -> None:
    doc = study(sites=4, annotations=SITE_ADDRESS)
    kinds = {
        role: sorted({c["kind"] for c in plan_for(doc, cfg).children})
        for role, cfg in {
            "standalone": OperatorConfig(role="standalone"),
            "coordinator": OperatorConfig(role="coordinator"),
            "site": OperatorConfig(role="site", site_name="site1"),
        }.items()
    }
    assert kinds["coordinator"] == [
        "ConfigMap",
        "Deployment",
        "NetworkPolicy",
        "PersistentVolumeClaim",
        "Service",
    ]
    assert kinds["site"] == ["ConfigMap", "Job", "NetworkPolicy", "PersistentVolumeClaim"]
    assert kinds["standalone"] == sorted(set(kinds["coordinator"]) | set(kinds["site"]))

    standalone = plan_for(doc, OperatorConfig())
    assert [j["metadata"]["name"] for j in by_kind(standalone.children, "Job")] == [
        f"heart-trainer-site{i}" for i in range(4)
    ]
    site = plan_for(doc, OperatorConfig(role="site", site_name="site1"))
    assert [j["metadata"]["name"] for j in by_kind(site.children, "Job")] == ["heart-trainer-site1"]
    assert site.sites == ["site1"]
    # A site cluster whose site the study does not list builds no trainer.
    assert plan_for(doc, OperatorConfig(role="site", site_name="elsewhere")).sites == []


def test_aggregator_deployment() -> None:
    plan = plan_for(study(sites=2), OperatorConfig())
    (dep,) = by_kind(plan.children, "Deployment")
    assert dep["metadata"]["name"] == "heart-aggregator"
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    template = dep["spec"]["template"]
    assert template["metadata"]["annotations"][builders.CONFIG_HASH] == plan.config_hash
    sel = dep["spec"]["selector"]["matchLabels"]
    assert sel.items() <= template["metadata"]["labels"].items()
    (c,) = template["spec"]["containers"]
    assert c["command"] == ["fedstudy"]
    assert c["args"] == [
        "aggregator",
        "--study",
        "/etc/fedstudy/study.yaml",
        "--listen",
        "0.0.0.0:7700",
        "--http",
        "0.0.0.0:8080",
        "--state-dir",
        "/var/lib/fedstudy/aggregator",
        "--out",
        "/var/lib/fedstudy/aggregator/out",
        "--tls-dir",
        "/etc/fedstudy/tls",
    ]
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"grpc": 7700, "http": 8080}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/etc/fedstudy"]["readOnly"] is True
    assert "/var/lib/fedstudy/aggregator" in mounts
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    assert volumes["state"]["persistentVolumeClaim"]["claimName"] == "heart-aggregator-state"
    cm_src, secret_src = volumes["config"]["projected"]["sources"]
    assert cm_src["configMap"]["name"] == "heart-study"
    assert secret_src["secret"]["name"] == "heart-aggregator-tls"
    assert secret_src["secret"]["optional"] is True

    (svc,) = by_kind(plan.children, "Service")
    assert svc["spec"]["type"] == "ClusterIP"
    assert {p["port"] for p in svc["spec"]["ports"]} == {7700, 8080}
    (cm,) = by_kind(plan.children, "ConfigMap")
    doc = cm["data"]["study.yaml"]
    assert "kind: FederatedStudy" in doc
    assert "rounds: 3" in doc
    assert "status" not in doc


def test_blocked_study_scales_to_zero_and_suspends() -> None:
    plan = plan_for(study(sites=2), OperatorConfig(), blocked=True)
    (dep,) = by_kind(plan.children, "Deployment")
    assert dep["spec"]["replicas"] == 0
    assert all(j["spec"]["suspend"] is True for j in by_kind(plan.children, "Job"))
    running = plan_for(study(sites=2), OperatorConfig())
    assert all(j["spec"]["suspend"] is False for j in by_kind(running.children, "Job"))


def test_a_finished_study_scales_its_aggregator_down() -> None:
    doc = with_server_fields(study(sites=2))
    s = parse_study({k: doc[k] for k in ("apiVersion", "kind", "metadata", "spec")})
    options, _ = parse_options({}, OperatorConfig(), ["site0", "site1"])
    plan = builders.build_children(doc, s, options, OperatorConfig(), blocked=False, finished=True)
    (dep,) = by_kind(plan.children, "Deployment")
    assert dep["spec"]["replicas"] == 0
    assert all(j["spec"]["suspend"] is False for j in by_kind(plan.children, "Job"))


@pytest.mark.parametrize("service_type", ["LoadBalancer", "NodePort", "nodeport"])
def test_external_service_exposes_grpc_only(service_type: str) -> None:
    doc = study(annotations={"fedstudy.io/aggregator-service-type": service_type})
    services = by_kind(plan_for(doc, OperatorConfig(role="coordinator")).children, "Service")
    internal, external = services
    assert internal["spec"]["type"] == "ClusterIP"
    assert external["metadata"]["name"] == "heart-aggregator-external"
    assert external["spec"]["type"].lower() == service_type.lower()
    assert [p["port"] for p in external["spec"]["ports"]] == [7700]


def test_trainer_job_for_a_gpu_site_in_site_role() -> None:
    doc, config = SCENARIOS["site-scheduling-and-storage"]
    plan = plan_for(doc, config)
    (job,) = by_kind(plan.children, "Job")
    assert job["metadata"]["name"] == "heart-trainer-site0"
    assert job["spec"]["backoffLimit"] == 6
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert pod["priorityClassName"] == "research-batch"
    (c,) = pod["containers"]
    assert c["image"] == "registry.example/fedstudy:1.2.3"
    assert c["args"] == [
        "trainer",
        "--study",
        "/etc/fedstudy/study.yaml",
        "--site",
        "site0",
        "--aggregator",
        "fl.hospital-network.example:7700",
        "--state-dir",
        "/var/lib/fedstudy/site",
        "--tls-dir",
        "/etc/fedstudy/tls",
    ]
    assert c["resources"] == {
        "requests": {"cpu": "2", "memory": "4Gi"},
        "limits": {"memory": "4Gi", "nvidia.com/gpu": "1"},
    }
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/data"] == {"name": "data", "mountPath": "/data", "readOnly": True}
    assert mounts["/etc/fedstudy"]["readOnly"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"] == {
        "claimName": "cleveland-records",
        "readOnly": True,
    }
    assert volumes["state"]["persistentVolumeClaim"]["claimName"] == "heart-state-site0"
    secret = volumes["config"]["projected"]["sources"][1]["secret"]
    assert secret["name"] == "heart-site0-tls"
    assert secret["optional"] is True
    (pvc,) = by_kind(plan.children, "PersistentVolumeClaim")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "5Gi"
    assert pvc["spec"]["storageClassName"] == "fast-ssd"
    (policy,) = by_kind(plan.children, "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert policy["spec"]["ingress"] == []
    dns, grpc = policy["spec"]["egress"]
    assert {p["port"] for p in dns["ports"]} == {53}
    assert {p["protocol"] for p in dns["ports"]} == {"UDP", "TCP"}
    assert grpc == {
        "ports": [{"protocol": "TCP", "port": 7700}],
        "to": [{"ipBlock": {"cidr": "203.0.113.10/32"}}],
    }


def test_standalone_trainers_dial_the_service_and_default_data_pvc() -> None:
    plan = plan_for(study(sites=2), OperatorConfig())
    jobs = by_kind(plan.children, "Job")
    for i, job in enumerate(jobs):
        pod = job["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        assert c["args"][c["args"].index("--aggregator") + 1] == (
            "heart-aggregator.research.svc:7700"
        )
        assert "resources" not in c
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["data"]["persistentVolumeClaim"] == {
            "claimName": f"heart-data-site{i}",
            "readOnly": True,
        }
    trainer_policy = next(
        p
        for p in by_kind(plan.children, "NetworkPolicy")
        if p["metadata"]["name"] == "heart-trainer"
    )
    assert trainer_policy["spec"]["egress"][1]["to"] == [
        {"podSelector": {"matchLabels": builders.selector("heart", "aggregator")}}
    ]
    agg_policy = next(
        p
        for p in by_kind(plan.children, "NetworkPolicy")
        if p["metadata"]["name"] == "heart-aggregator"
    )
    grpc, http = agg_policy["spec"]["ingress"]
    assert grpc["from"] == [{"podSelector": {"matchLabels": builders.selector("heart", "trainer")}}]
    assert http["ports"] == [{"protocol": "TCP", "port": 8080}]


def test_coordinator_network_policy_opens_grpc_to_the_sites_and_status_to_monitoring() -> None:
    doc, config = SCENARIOS["coordinator-loadbalancer"]
    (policy,) = by_kind(plan_for(doc, config).children, "NetworkPolicy")
    grpc, http = policy["spec"]["ingress"]
    assert grpc["from"] == [
        {"ipBlock": {"cidr": "192.0.2.0/24"}},
        {"ipBlock": {"cidr": "198.51.100.7/32"}},
    ]
    (expr,) = http["from"][0]["namespaceSelector"]["matchExpressions"]
    assert expr["values"] == ["fedstudy-system", "monitoring", "research"]
    # Without CIDRs, gRPC is open: sites dial in from other clusters.
    (open_policy,) = by_kind(
        plan_for(study(), OperatorConfig(role="coordinator")).children, "NetworkPolicy"
    )
    assert "from" not in open_policy["spec"]["ingress"][0]


def test_heart_disease_data_paths_resolve_like_the_trainer() -> None:
    plan = plan_for(example("heart-disease"), OperatorConfig())
    job = by_kind(plan.children, "Job")[0]
    (c,) = job["spec"]["template"]["spec"]["containers"]
    data = next(m for m in c["volumeMounts"] if m["name"] == "data")
    # ../../shared/data/... relative to /etc/fedstudy/study.yaml
    assert data["mountPath"] == "/shared/data/heart-disease"
    builtin = plan_for(example("breast-cancer"), OperatorConfig())
    for job in by_kind(builtin.children, "Job"):
        assert all(v["name"] != "data" for v in job["spec"]["template"]["spec"]["volumes"])


@pytest.mark.parametrize(
    ("path", "clash"),
    [
        ("/etc/fedstudy/data.csv", True),
        ("/x.csv", True),
        ("/tmp/x.csv", True),
        ("/data/x.csv", False),
    ],
)
def test_data_paths_that_would_cover_the_trainers_own_mounts(path: str, clash: bool) -> None:
    doc = study(sites=1)
    doc["spec"]["sites"][0]["data"]["path"] = path
    problems = builders.data_path_problems(parse_study(doc))
    assert bool(problems) == clash
    if clash:
        assert problems[0].startswith("spec.sites[0].data.path: ")


def test_names_are_deterministic_and_fit_63_characters() -> None:
    long_study, long_site = "s" * 50, "hospital-" + "x" * 40
    a = builders.trainer_name(long_study, long_site)
    assert a == builders.trainer_name(long_study, long_site)
    assert len(a) <= 63
    assert a != builders.trainer_name(long_study, long_site + "y")
    assert builders.trainer_name("heart", "va") == "heart-trainer-va"


def test_config_hash_follows_the_spec_only() -> None:
    doc = study()
    a = plan_for(doc, OperatorConfig()).config_hash
    with_status = copy.deepcopy(doc)
    with_status["status"] = {"phase": "Running"}
    assert plan_for(with_status, OperatorConfig()).config_hash == a
    changed = copy.deepcopy(doc)
    changed["spec"]["rounds"] = 10
    assert plan_for(changed, OperatorConfig()).config_hash != a


@pytest.mark.parametrize(
    ("annotations", "config", "expected"),
    [
        ({"fedstudy.io/aggregator-service-type": "Ingress"}, OperatorConfig(), "must be one of"),
        ({}, OperatorConfig(role="site", site_name="site0"), "required in site role"),
        ({"fedstudy.io/aggregator-address": "no-port"}, OperatorConfig(), "HOST:PORT"),
        ({"fedstudy.io/node-selector": "{not json"}, OperatorConfig(), "not valid JSON"),
        ({"fedstudy.io/node-selector": '{"a": 1}'}, OperatorConfig(), "JSON object of strings"),
        ({"fedstudy.io/tolerations": '[{"colour": "red"}]'}, OperatorConfig(), "tolerations"),
        ({"fedstudy.io/grpc-ingress-cidrs": "10.0.0.0/33"}, OperatorConfig(), "not a CIDR"),
        ({"fedstudy.io/storage-size": "lots"}, OperatorConfig(), "not a quantity"),
        ({"fedstudy.io/data-pvc-nowhere": "x"}, OperatorConfig(), "lists no site"),
        ({"fedstudy.io/data-hostpath-site0": "rel/dir"}, OperatorConfig(), "absolute"),
    ],
)
def test_bad_annotations_are_problems_with_their_path(
    annotations: dict[str, str], config: OperatorConfig, expected: str
) -> None:
    _, problems = parse_options(annotations, config, ["site0"])
    assert len(problems) == 1
    assert problems[0].startswith('metadata.annotations["fedstudy.io/')
    assert expected in problems[0]
