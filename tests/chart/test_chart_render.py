"""The chart rendered with real helm: lint, every scenario, schema strictness, what it makes.

Built-in kinds are validated with kubernetes-validate (strict) against Kubernetes 1.30 and the
newest version it knows; custom resources (ServiceMonitor, PodMonitor, PrometheusRule,
Certificate, Issuer) have no schema there and are checked field by field.
"""

from __future__ import annotations

import json
import re
from typing import Any

import kubernetes_validate
import pytest
import yaml
from chart_support import (
    CHART,
    NAMESPACE,
    ROOT,
    SCENARIOS,
    by_kind,
    helm,
    one,
    operator_container,
    render,
    render_text,
    scenario_file,
    scenario_values,
)
from fedop_support import study
from fedstudy_operator import builders
from fedstudy_operator import main as operator_main
from fedstudy_operator.options import OperatorConfig, parse_options

from fedstudy.spec import parse_study

K8S_VERSIONS = ["1.30", kubernetes_validate.latest_version()]
CUSTOM_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule", "Certificate", "Issuer"}
ALL = [None, *SCENARIOS]  # None: the chart's defaults


def test_the_scenarios_are_there() -> None:
    assert {"coordinator", "site", "standalone", "full"} <= set(SCENARIOS)


@pytest.mark.parametrize("scenario", ALL)
def test_helm_lint_strict(scenario: str | None) -> None:
    args = ["lint", "--strict", str(CHART), "--namespace", NAMESPACE]
    if scenario is not None:
        args += ["-f", str(scenario_file(scenario))]
    out = helm(*args).stdout
    assert "0 chart(s) failed" in out


@pytest.mark.parametrize("scenario", ALL)
def test_every_document_is_valid(scenario: str | None) -> None:
    docs = render(scenario)
    assert docs
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in CUSTOM_KINDS:
            check_custom_resource(doc)
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{name} is invalid for Kubernetes {version}: {e}")
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "fedstudy", name
        assert labels["app.kubernetes.io/managed-by"] == "Helm", name
        if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"]["namespace"], name


def check_custom_resource(doc: dict[str, Any]) -> None:
    kind, spec = doc["kind"], doc["spec"]
    assert doc["metadata"]["namespace"]
    if kind == "ServiceMonitor":
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        assert spec["selector"]["matchLabels"]
        (endpoint,) = spec["endpoints"]
        assert endpoint["port"] == "http-metrics"
        assert endpoint["path"] == "/metrics"
    elif kind == "PodMonitor":
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        assert spec["selector"]["matchLabels"]
        assert spec["namespaceSelector"]
        (endpoint,) = spec["podMetricsEndpoints"]
        assert endpoint["port"]
        assert endpoint["path"] == "/metrics"
    elif kind == "PrometheusRule":
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        assert spec["groups"]
        for group in spec["groups"]:
            assert group["name"]
            assert group["rules"]
            for rule in group["rules"]:
                assert rule.get("alert") or rule.get("record")
                assert isinstance(rule["expr"], str | int)
    elif kind == "Certificate":
        assert doc["apiVersion"] == "cert-manager.io/v1"
        assert spec["secretName"]
        assert spec["commonName"]
        assert spec["issuerRef"]["name"]
        assert spec["issuerRef"]["kind"] in (
            "Issuer",
            "ClusterIssuer",
        )
        assert {"client auth", "server auth"} & set(spec["usages"])
    elif kind == "Issuer":
        assert doc["apiVersion"] == "cert-manager.io/v1"
        assert spec["ca"]["secretName"]


# --- the operator's command line ---------------------------------------------------------------


@pytest.mark.parametrize("scenario", ALL)
def test_the_deployment_runs_the_operator_as_the_values_say(scenario: str | None) -> None:
    values = scenario_values(scenario) if scenario else {}
    container = operator_container(render(scenario))
    assert container["command"] == ["fedstudy"]
    args = container["args"]
    assert args[0] == "operator"
    parsed = operator_main.build_parser().parse_args(args[1:])
    assert parsed.role == values.get("role", "standalone")
    assert parsed.site_name == (values.get("siteName") or None)
    watch = values.get("watch", {})
    if watch.get("allNamespaces"):
        assert parsed.all_namespaces
        assert parsed.namespace is None
    else:
        assert parsed.namespace == (watch.get("namespaces") or [NAMESPACE])
    assert parsed.metrics_port == 8090
    images = values.get("studyImages", {})
    assert parsed.aggregator_image == images.get("aggregator", "fedstudy-aggregator:0.1.0")
    assert parsed.trainer_image == images.get("trainer", "fedstudy-trainer:0.1.0")
    port = container["ports"][0]
    assert port["containerPort"] == parsed.metrics_port
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


def test_site_role_needs_a_site_name() -> None:
    proc = helm("template", "fs", str(CHART), "--set", "role=site", check=False)
    assert proc.returncode != 0
    assert "siteName" in proc.stderr
    proc = helm("template", "fs", str(CHART), "--set", "siteName=cleveland", check=False)
    assert proc.returncode != 0
    assert "siteName" in proc.stderr


# --- the values schema --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ("rol=site", "rol"),
        ("metrics.enabeld=true", "enabeld"),
        ("metrics.serviceMonitor.intervall=10s", "intervall"),
        ("certManager.issuer.caSecret=x", "caSecret"),
        ("watch.namespace=research", "namespace"),
        ("image.tags=1", "tags"),
    ],
)
def test_a_misspelt_value_fails_naming_the_key(setting: str, key: str) -> None:
    proc = helm("template", "fs", str(CHART), "--set", setting, check=False)
    assert proc.returncode != 0, f"--set {setting} rendered"
    assert key in proc.stderr


@pytest.mark.parametrize(
    "setting", ["role=hospital", "operator.logFormat=xml", "watch.namespaces[0]=Research"]
)
def test_a_bad_value_fails(setting: str) -> None:
    assert helm("template", "fs", str(CHART), "--set", setting, check=False).returncode != 0


def test_global_takes_anything() -> None:
    render_text(None, "global.imageRegistry=example.org", "global.anything.nested=1")


def test_the_schema_is_closed_everywhere_but_global() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(node: dict[str, Any], path: str) -> None:
        if node.get("type") == "object" and "properties" in node:
            assert node.get("additionalProperties") is False, f"{path or '.'} is open"
            for key, child in node["properties"].items():
                if path == "" and key == "global":
                    continue
                walk(child, f"{path}.{key}")

    walk(schema, "")
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values) == set(schema["properties"])


def test_every_value_is_documented_by_name() -> None:
    """Each key of values.yaml has a comment above it starting with its dotted name."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str]] = []
    comments: list[str] = []
    missing = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#"):
            comments.append(stripped.lstrip("# "))
            continue
        m = re.match(r"^(\s*)([A-Za-z][A-Za-z0-9]*):(.*)$", line)
        if not m:
            comments = [] if not stripped else comments
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3).strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([k for _, k in stack] + [key])
        is_parent = rest == "" and dotted not in ("resources", "tests.resources")
        under_free_map = any(
            k in ("requests", "limits", "resources") for _, k in stack
        )  # resources' requests/limits are Kubernetes fields
        if (
            not under_free_map
            and not is_parent
            and not any(c.startswith(dotted + " ") for c in comments)
        ):
            missing.append(dotted)
        stack.append((indent, key))
        comments = []
    assert not missing, f"values without a comment starting with their name: {missing}"


# --- what each scenario makes -------------------------------------------------------------------


def test_named_namespaces_get_a_role_each_and_nothing_cluster_wide() -> None:
    docs = render("coordinator")
    assert not by_kind(docs, "ClusterRole")
    assert not by_kind(docs, "ClusterRoleBinding")
    roles = {r["metadata"]["namespace"]: r for r in by_kind(docs, "Role")}
    assert set(roles) == {"research", "cardiology"}
    bindings = by_kind(docs, "RoleBinding")
    assert {b["metadata"]["namespace"] for b in bindings} == set(roles)
    sa = one(docs, "ServiceAccount")
    for b in bindings:
        (subject,) = b["subjects"]
        assert subject == {
            "kind": "ServiceAccount",
            "name": sa["metadata"]["name"],
            "namespace": NAMESPACE,
        }
        assert b["roleRef"]["name"] == roles[b["metadata"]["namespace"]]["metadata"]["name"]
    check_rules(roles["research"]["rules"], cluster=False)


def test_all_namespaces_get_a_cluster_role() -> None:
    docs = render("standalone")
    assert not by_kind(docs, "Role")
    assert not by_kind(docs, "RoleBinding")
    role = one(docs, "ClusterRole")
    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    check_rules(role["rules"], cluster=True)


def check_rules(rules: list[dict[str, Any]], *, cluster: bool) -> None:
    grants: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        assert "*" not in rule["verbs"]
        assert "*" not in rule["resources"]
        assert "*" not in rule["apiGroups"]
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                grants.setdefault((group, resource), set()).update(rule["verbs"])
    crud = {"get", "list", "watch", "create", "patch", "delete"}
    assert grants[("fedstudy.io", "federatedstudies")] == {"get", "list", "watch", "patch"}
    assert grants[("fedstudy.io", "federatedstudies/status")] == {"get", "patch"}
    for key in [
        ("", "configmaps"),
        ("", "services"),
        ("", "persistentvolumeclaims"),
        ("apps", "deployments"),
        ("batch", "jobs"),
        ("networking.k8s.io", "networkpolicies"),
    ]:
        assert grants.pop(key) == crud, key
    assert grants.pop(("", "events")) == {"create", "patch"}
    assert grants.pop(("events.k8s.io", "events")) == {"create", "patch"}
    crds = grants.pop(("apiextensions.k8s.io", "customresourcedefinitions"), None)
    assert crds == ({"get", "list", "watch"} if cluster else None)
    assert not any(r == "secrets" for _, r in grants), "the operator never reads Secrets"


def test_site_scenario() -> None:
    docs = render("site")
    args = operator_container(docs)["args"]
    assert args[args.index("--role") + 1] == "site"
    assert args[args.index("--site-name") + 1] == "cleveland"
    assert not by_kind(docs, "Certificate")


def test_monitoring_is_off_by_default_and_each_part_has_its_switch() -> None:
    kinds = {d["kind"] for d in render(None)}
    assert not kinds & CUSTOM_KINDS
    assert "ConfigMap" not in kinds
    base = ["metrics.enabled=true"]
    switches = {
        "metrics.serviceMonitor.enabled=true": "ServiceMonitor",
        "metrics.aggregatorPodMonitor.enabled=true": "PodMonitor",
        "metrics.prometheusRule.enabled=true": "PrometheusRule",
        "metrics.dashboard.enabled=true": "ConfigMap",
    }
    for setting, kind in switches.items():
        made = {d["kind"] for d in render(None, *base, setting)}
        assert kind in made, setting
        assert made & (set(switches.values()) - {kind}) == set(), setting
    proc = helm("template", "fs", str(CHART), "--set", "metrics.prometheusRule.enabled=true",
                check=False)  # fmt: skip
    assert proc.returncode != 0
    assert "metrics.enabled" in proc.stderr


def test_full_scenario_monitoring() -> None:
    docs = render("full")
    service = next(s for s in by_kind(docs, "Service"))
    deployment = one(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels[k] == v for k, v in service["spec"]["selector"].items())
    monitor = one(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    service_labels = service["metadata"]["labels"]
    assert all(
        service_labels[k] == v for k, v in monitor["spec"]["selector"]["matchLabels"].items()
    )

    pod_monitor = one(docs, "PodMonitor")
    assert pod_monitor["spec"]["namespaceSelector"] == {"matchNames": ["research"]}
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] == "http"
    check_pod_monitor_selects_aggregators(pod_monitor)

    rule = one(docs, "PrometheusRule")
    source = yaml.safe_load((CHART / "alerts" / "fedstudy-rules.yaml").read_text())
    assert rule["spec"]["groups"] == source["groups"]

    (dashboard,) = [
        c for c in by_kind(docs, "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")
    ]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "Research"}
    text = (CHART / "dashboards" / "fedstudy.json").read_text()
    assert json.loads(dashboard["data"]["fedstudy.json"]) == json.loads(text)


def check_pod_monitor_selects_aggregators(pod_monitor: dict[str, Any]) -> None:
    """The PodMonitor's selector and port match the aggregator pods the operator builds."""
    body = study("heart", 2)
    body["metadata"].update(uid="4c1d6a5e-0000-4000-8000-000000000001", generation=1)
    s = parse_study({k: body[k] for k in ("apiVersion", "kind", "metadata", "spec")})
    config = OperatorConfig(role="coordinator")
    options, problems = parse_options({}, config, [x.name for x in s.spec.sites])
    assert problems == []
    plan = builders.build_children(body, s, options, config, blocked=False)
    (aggregator,) = [c for c in plan.children if c["kind"] == "Deployment"]
    labels = aggregator["spec"]["template"]["metadata"]["labels"]
    wanted = pod_monitor["spec"]["selector"]["matchLabels"]
    assert all(labels.get(k) == v for k, v in wanted.items()), (wanted, labels)
    ports = {p["name"] for p in aggregator["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] in ports


def test_cert_manager() -> None:
    docs = render("full")
    issuer = one(docs, "Issuer")
    assert issuer["spec"]["ca"]["secretName"] == "heart-disease-ca"
    certs = {c["metadata"]["name"]: c["spec"] for c in by_kind(docs, "Certificate")}
    sites = ["cleveland", "hungarian", "switzerland", "va"]
    assert set(certs) == {f"heart-disease-{s}" for s in [*sites, "aggregator"]}
    for site in sites:
        spec = certs[f"heart-disease-{site}"]
        assert spec["commonName"] == site
        assert spec["secretName"] == f"heart-disease-{site}-tls"
        assert "client auth" in spec["usages"]
        assert "server auth" not in spec["usages"]
        assert spec["issuerRef"]["name"] == issuer["metadata"]["name"]
    agg = certs["heart-disease-aggregator"]
    assert agg["secretName"] == "heart-disease-aggregator-tls"
    assert "server auth" in agg["usages"]
    assert "client auth" not in agg["usages"]
    assert "fl.example.org" in agg["dnsNames"]
    assert "heart-disease-aggregator.research.svc" in agg["dnsNames"]

    # Role site: its own certificate only, from an existing issuer.
    docs = render(
        "site",
        "certManager.enabled=true",
        "certManager.study=heart-disease",
        "certManager.issuer.create=false",
        "certManager.issuer.ref.name=hospital-ca",
        "certManager.issuer.ref.kind=ClusterIssuer",
    )
    assert not by_kind(docs, "Issuer")
    (cert,) = by_kind(docs, "Certificate")
    assert cert["spec"]["commonName"] == "cleveland"
    assert cert["spec"]["issuerRef"] == {
        "name": "hospital-ca",
        "kind": "ClusterIssuer",
        "group": "cert-manager.io",
    }


def test_secret_names_match_the_operator() -> None:
    long_study = "a-very-long-study-name-for-a-multi-centre-cardiology-trial"
    docs = render(
        None,
        "certManager.enabled=true",
        f"certManager.study={long_study}",
        "certManager.issuer.caSecretName=ca",
        "certManager.sites={cleveland}",
    )
    secrets = {c["spec"]["secretName"] for c in by_kind(docs, "Certificate")}
    assert secrets == {
        builders.tls_secret_name(long_study, "cleveland"),
        builders.tls_secret_name(long_study, "aggregator"),
    }


def test_the_helm_test_pod() -> None:
    docs = render(None)
    pods = by_kind(docs, "Pod")
    (pod,) = pods
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Never"
    assert spec["automountServiceAccountToken"] is False
    (container,) = spec["containers"]
    assert container["image"] == operator_container(docs)["image"]
    assert container["command"] == ["python", "-c"]
    compile(container["args"][0], "helm-test", "exec")
    url = container["args"][1]
    service = one(docs, "Service")
    port = service["spec"]["ports"][0]["port"]
    assert url == f"http://{service['metadata']['name']}.{NAMESPACE}.svc:{port}/healthz"
    check_restricted(spec)
    assert not by_kind(render(None, "tests.enabled=false"), "Pod")


@pytest.mark.parametrize("scenario", ALL)
def test_pods_meet_the_restricted_profile(scenario: str | None) -> None:
    docs = render(scenario)
    for doc in by_kind(docs, "Deployment"):
        check_restricted(doc["spec"]["template"]["spec"])


def check_restricted(spec: dict[str, Any]) -> None:
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] == 10001
    assert pod["seccompProfile"]["type"] == "RuntimeDefault"
    assert not spec.get("hostNetwork")
    assert not spec.get("hostPID")
    for c in spec["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["runAsNonRoot"] is True
        assert "requests" in c["resources"]
        assert "limits" in c["resources"]


def test_selectors_never_carry_the_chart_version() -> None:
    docs = render("full")
    deployment = one(docs, "Deployment")
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert "helm.sh/chart" not in selector
    assert "app.kubernetes.io/version" not in selector
    for service in by_kind(docs, "Service"):
        assert "helm.sh/chart" not in service["spec"]["selector"]


def test_the_crd_is_in_crds_and_rendered_with_include_crds() -> None:
    crd_file = CHART / "crds" / "federatedstudies.fedstudy.io.yaml"
    assert crd_file.exists()
    assert not any(d["kind"] == "CustomResourceDefinition" for d in render(None))
    out = helm("template", "fs", str(CHART), "--include-crds").stdout
    crds = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "CustomResourceDefinition"]
    assert crds == [yaml.safe_load(crd_file.read_text())]


@pytest.mark.parametrize("scenario", ALL)
def test_notes(scenario: str | None) -> None:
    args = ["install", "fs", str(CHART), "--dry-run=client", "-n", NAMESPACE]
    if scenario is not None:
        args += ["-f", str(scenario_file(scenario))]
    proc = helm(*args, check=False)
    if proc.returncode != 0:
        pytest.skip(f"helm install --dry-run=client needs no cluster, but failed: {proc.stderr}")
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert "kubectl apply --server-side -f -" in notes
    assert "never upgrades" in notes
    role = (scenario_values(scenario) if scenario else {}).get("role", "standalone")
    assert f'role "{role}"' in notes


def test_the_chart_copies_of_monitoring_are_identical() -> None:
    monitoring = ROOT / "monitoring"
    if not monitoring.is_dir():
        pytest.skip("monitoring/ is absent: nothing to compare the chart's copies with")
    pairs = {
        CHART / "dashboards" / "fedstudy.json": monitoring / "dashboards" / "fedstudy.json",
        CHART / "alerts" / "fedstudy-rules.yaml": monitoring / "alerts" / "fedstudy-rules.yaml",
    }
    for copy, source in pairs.items():
        assert source.exists(), f"{source} is gone: the chart copies it"
        assert copy.read_bytes() == source.read_bytes(), (
            f"{copy.relative_to(ROOT)} differs from {source.relative_to(ROOT)}: "
            f"cp {source.relative_to(ROOT)} {copy.relative_to(ROOT)}"
        )
