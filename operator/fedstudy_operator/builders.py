"""Pure builders: a study and its settings in, Kubernetes manifests (plain dicts) out.

Nothing here calls the API. Names are deterministic (``<study>-aggregator``,
``<study>-trainer-<site>``, ...), so a retried or restarted reconcile finds what it made
before instead of making a second one. Every child carries an owner reference to the study
(``kopf.adopt``): deleting the study deletes them.

Every pod meets the "restricted" Pod Security Standard: non-root user 10001, no privilege
escalation, all capabilities dropped, the RuntimeDefault seccomp profile and a read-only root
filesystem with an ``emptyDir`` at ``/tmp`` for scratch. (A site whose data comes from a
``hostPath``, an opt-in for development clusters, is the one exception: the restricted
profile forbids host paths.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import posixpath
from collections.abc import Mapping
from typing import Any, cast

import kopf
import yaml

from fedstudy.spec import IMAGE_FORMATS, FederatedStudy, Site
from fedstudy_operator.options import OperatorConfig, StudyOptions

Manifest = dict[str, Any]

GRPC_PORT = 7700
HTTP_PORT = 8080
BACKOFF_LIMIT = 6
USER_ID = 10001
STUDY_DIR = "/etc/fedstudy"
STUDY_FILE = f"{STUDY_DIR}/study.yaml"
TLS_DIR = f"{STUDY_DIR}/tls"
AGGREGATOR_STATE = "/var/lib/fedstudy/aggregator"
SITE_STATE = "/var/lib/fedstudy/site"
SCRATCH = "/tmp"
# Where nothing else may be mounted: the data directory of a site must stay clear of these.
RESERVED_DIRS = (STUDY_DIR, SITE_STATE, SCRATCH, "/var/lib/fedstudy")

APPLIED_HASH = "fedstudy.io/applied-hash"
CONFIG_HASH = "fedstudy.io/config-hash"
STUDY_LABEL = "fedstudy.io/study"
SITE_LABEL = "fedstudy.io/site"
COMPONENT_LABEL = "app.kubernetes.io/component"
MANAGED_BY = "fedstudy-operator"

_MAX_NAME = 63


def child_name(*parts: str) -> str:
    """``-``-joined parts, cut to 63 characters with a hash suffix when longer (deterministic)."""
    full = "-".join(parts)
    if len(full) <= _MAX_NAME:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:8]
    return f"{full[: _MAX_NAME - 9].rstrip('-')}-{digest}"


def config_map_name(study: str) -> str:
    return child_name(study, "study")


def aggregator_name(study: str) -> str:
    return child_name(study, "aggregator")


def aggregator_external_name(study: str) -> str:
    return child_name(study, "aggregator", "external")


def aggregator_state_name(study: str) -> str:
    return child_name(study, "aggregator", "state")


def trainer_name(study: str, site: str) -> str:
    return child_name(study, "trainer", site)


def trainer_state_name(study: str, site: str) -> str:
    return child_name(study, "state", site)


def trainer_policy_name(study: str) -> str:
    return child_name(study, "trainer")


def tls_secret_name(study: str, who: str) -> str:
    """The Secret ``fedstudy certs --kubernetes-secret`` writes: ``<study>-<site>-tls``."""
    return child_name(study, who, "tls")


def labels(study: str, component: str, site: str | None = None) -> dict[str, str]:
    out = {
        "app.kubernetes.io/name": "fedstudy",
        "app.kubernetes.io/instance": study,
        COMPONENT_LABEL: component,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        STUDY_LABEL: study,
    }
    if site is not None:
        out[SITE_LABEL] = site
    return out


def selector(study: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "fedstudy",
        "app.kubernetes.io/instance": study,
        COMPONENT_LABEL: component,
    }


def content_hash(obj: Any) -> str:
    """A short, stable digest of a JSON-able value."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def study_document(body: Mapping[str, Any]) -> str:
    """The study as the entry points read it: apiVersion, kind, name and the spec as written."""
    doc = {
        "apiVersion": body["apiVersion"],
        "kind": body["kind"],
        "metadata": {"name": body["metadata"]["name"]},
        "spec": body["spec"],
    }
    return yaml.safe_dump(doc, sort_keys=False)


def data_mount_dir(site: Site) -> str | None:
    """The directory to mount for a site's data file, resolved as the trainer resolves it."""
    if site.data.path is None:
        return None
    return posixpath.dirname(posixpath.normpath(posixpath.join(STUDY_DIR, site.data.path)))


def data_labels_path(site: Site) -> str | None:
    """An image site's labels CSV as the trainer resolves it (from the image folder)."""
    if site.data.path is None or site.data.format not in IMAGE_FORMATS:
        return None
    folder = posixpath.normpath(posixpath.join(STUDY_DIR, site.data.path))
    return posixpath.normpath(posixpath.join(folder, site.data.labels or "labels.csv"))


def data_path_problems(study: FederatedStudy) -> list[str]:
    """Data paths that cannot be mounted in a pod (the root, or over the study's own mounts)."""
    problems = []
    for i, site in enumerate(study.spec.sites):
        d = data_mount_dir(site)
        if d is None:
            continue
        labels = data_labels_path(site)
        if labels is not None and not labels.startswith(d.rstrip("/") + "/"):
            problems.append(
                f"spec.sites[{i}].data.labels: {labels} lies outside the data directory {d} "
                "that the trainer's pod mounts; keep the labels CSV in the image folder "
                "(a path relative to it)"
            )
        clash = [
            r
            for r in RESERVED_DIRS
            if d == "/" or d == r or d.startswith(r + "/") or r.startswith(d + "/")
        ]
        if clash:
            problems.append(
                f"spec.sites[{i}].data.path: the data directory {d} would be mounted over "
                f"{clash[0]}, which the trainer needs; put the data in a directory of its "
                "own, e.g. /data"
            )
    return problems


# --- pods --------------------------------------------------------------------------------


def _pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": USER_ID,
        "runAsGroup": USER_ID,
        "fsGroup": USER_ID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": USER_ID,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _env() -> list[dict[str, Any]]:
    return [
        {"name": "HOME", "value": SCRATCH},
        {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]


def _config_volume(study: str, tls_secret: str) -> dict[str, Any]:
    """The study file and, once it exists, the TLS Secret, in one read-only directory.

    A projected volume keeps ``tls/`` inside ``/etc/fedstudy`` without nesting one mount in
    another; the Secret is optional, so pods start before mutual TLS is set up.
    """
    return {
        "name": "config",
        "projected": {
            "defaultMode": 0o440,
            "sources": [
                {
                    "configMap": {
                        "name": config_map_name(study),
                        "items": [{"key": "study.yaml", "path": "study.yaml"}],
                    }
                },
                {
                    "secret": {
                        "name": tls_secret,
                        "optional": True,
                        "items": [
                            {"key": "tls.crt", "path": "tls/tls.crt"},
                            {"key": "tls.key", "path": "tls/tls.key"},
                            {"key": "ca.crt", "path": "tls/ca.crt"},
                        ],
                    }
                },
            ],
        },
    }


def _scratch_volume() -> dict[str, Any]:
    return {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}


def _pvc(
    name: str, study: str, component: str, options: StudyOptions, site: str | None = None
) -> Manifest:
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": options.storage_size}},
    }
    if options.storage_class:
        spec["storageClassName"] = options.storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "labels": labels(study, component, site)},
        "spec": spec,
    }


# --- the aggregator ----------------------------------------------------------------------


def build_config_map(body: Mapping[str, Any]) -> Manifest:
    name = body["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": config_map_name(name), "labels": labels(name, "config")},
        "data": {"study.yaml": study_document(body)},
    }


def build_aggregator_deployment(
    study: FederatedStudy,
    options: StudyOptions,
    config_hash: str,
    blocked: bool,
    finished: bool = False,
) -> Manifest:
    name = study.name
    probe = {
        "httpGet": {"path": "/healthz", "port": "http"},
        "periodSeconds": 10,
        "timeoutSeconds": 3,
    }
    container = {
        "name": "aggregator",
        "image": options.aggregator_image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["fedstudy"],
        "args": [
            "aggregator",
            "--study",
            STUDY_FILE,
            "--listen",
            f"0.0.0.0:{GRPC_PORT}",
            "--http",
            f"0.0.0.0:{HTTP_PORT}",
            "--state-dir",
            AGGREGATOR_STATE,
            "--out",
            f"{AGGREGATOR_STATE}/out",
            "--tls-dir",
            TLS_DIR,
        ],
        "env": _env(),
        "ports": [
            {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
            {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": {**probe, "initialDelaySeconds": 2, "failureThreshold": 3},
        "livenessProbe": {**probe, "initialDelaySeconds": 10, "failureThreshold": 6},
        "securityContext": _container_security(),
        "volumeMounts": [
            {"name": "config", "mountPath": STUDY_DIR, "readOnly": True},
            {"name": "state", "mountPath": AGGREGATOR_STATE},
            {"name": "tmp", "mountPath": SCRATCH},
        ],
    }
    pod_labels = labels(name, "aggregator")
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": aggregator_name(name), "labels": labels(name, "aggregator")},
        "spec": {
            # Paused while the IRB approval has lapsed; scaled down once the study is over
            # (the aggregator exits then; its outputs stay on the state volume).
            "replicas": 0 if blocked or finished else 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": selector(name, "aggregator")},
            "template": {
                "metadata": {"labels": pod_labels, "annotations": {CONFIG_HASH: config_hash}},
                "spec": {
                    "automountServiceAccountToken": False,
                    "securityContext": _pod_security(),
                    "containers": [container],
                    "volumes": [
                        _config_volume(name, tls_secret_name(name, "aggregator")),
                        {
                            "name": "state",
                            "persistentVolumeClaim": {"claimName": aggregator_state_name(name)},
                        },
                        _scratch_volume(),
                    ],
                },
            },
        },
    }


def build_aggregator_services(study: FederatedStudy, options: StudyOptions) -> list[Manifest]:
    """The in-cluster Service (gRPC and HTTP status), plus an external one for gRPC only."""
    name = study.name
    internal = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": aggregator_name(name), "labels": labels(name, "aggregator")},
        "spec": {
            "type": "ClusterIP",
            "selector": selector(name, "aggregator"),
            "ports": [
                {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "protocol": "TCP"},
                {"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"},
            ],
        },
    }
    if options.service_type == "ClusterIP":
        return [internal]
    external = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": aggregator_external_name(name),
            "labels": labels(name, "aggregator"),
        },
        "spec": {
            "type": options.service_type,
            "selector": selector(name, "aggregator"),
            "ports": [{"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "protocol": "TCP"}],
        },
    }
    return [internal, external]


def build_aggregator_network_policy(
    study: FederatedStudy, options: StudyOptions, config: OperatorConfig, namespace: str
) -> Manifest:
    """gRPC from where the sites are; the HTTP status port from the namespace and monitoring."""
    name = study.name
    grpc_from: list[dict[str, Any]] | None
    if config.role == "standalone":
        grpc_from = [{"podSelector": {"matchLabels": selector(name, "trainer")}}]
    elif options.grpc_ingress_cidrs:
        grpc_from = [{"ipBlock": {"cidr": c}} for c in options.grpc_ingress_cidrs]
    else:
        grpc_from = None  # sites dial in from other clusters: from anywhere
    grpc_rule: dict[str, Any] = {"ports": [{"protocol": "TCP", "port": GRPC_PORT}]}
    if grpc_from is not None:
        grpc_rule["from"] = grpc_from
    namespaces = sorted(
        {namespace}
        | {n for n in (config.operator_namespace, options.monitoring_namespace) if n is not None}
    )
    http_rule = {
        "ports": [{"protocol": "TCP", "port": HTTP_PORT}],
        "from": [
            {
                "namespaceSelector": {
                    "matchExpressions": [
                        {
                            "key": "kubernetes.io/metadata.name",
                            "operator": "In",
                            "values": namespaces,
                        }
                    ]
                }
            }
        ],
    }
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": aggregator_name(name), "labels": labels(name, "aggregator")},
        "spec": {
            "podSelector": {"matchLabels": selector(name, "aggregator")},
            "policyTypes": ["Ingress"],
            "ingress": [grpc_rule, http_rule],
        },
    }


# --- the trainers ------------------------------------------------------------------------


def aggregator_address(
    study: FederatedStudy, options: StudyOptions, config: OperatorConfig, namespace: str
) -> str:
    """What trainers dial: the in-cluster Service in standalone, the annotation in site role."""
    if config.role == "site" and options.aggregator_address:
        return options.aggregator_address
    return f"{aggregator_name(study.name)}.{namespace}.svc:{GRPC_PORT}"


def _resources(site: Site) -> dict[str, Any]:
    r = site.resources
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if r.cpu:
        requests["cpu"] = r.cpu
    if r.memory:
        requests["memory"] = r.memory
        limits["memory"] = r.memory
    if r.gpu:
        limits["nvidia.com/gpu"] = str(r.gpu)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def build_trainer_job(
    study: FederatedStudy,
    site: Site,
    options: StudyOptions,
    address: str,
    blocked: bool,
) -> Manifest:
    name = study.name
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": STUDY_DIR, "readOnly": True},
        {"name": "state", "mountPath": SITE_STATE},
        {"name": "tmp", "mountPath": SCRATCH},
    ]
    volumes: list[dict[str, Any]] = [
        _config_volume(name, tls_secret_name(name, site.name)),
        {
            "name": "state",
            "persistentVolumeClaim": {"claimName": trainer_state_name(name, site.name)},
        },
        _scratch_volume(),
    ]
    data_dir = data_mount_dir(site)
    if data_dir is not None:
        source = options.data_source(name, site.name)
        mounts.append({"name": "data", "mountPath": data_dir, "readOnly": True})
        if source.host_path is not None:
            volumes.append(
                {"name": "data", "hostPath": {"path": source.host_path, "type": "Directory"}}
            )
        else:
            volumes.append(
                {
                    "name": "data",
                    "persistentVolumeClaim": {"claimName": source.pvc, "readOnly": True},
                }
            )
    container: dict[str, Any] = {
        "name": "trainer",
        "image": options.trainer_image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["fedstudy"],
        "args": [
            "trainer",
            "--study",
            STUDY_FILE,
            "--site",
            site.name,
            "--aggregator",
            address,
            "--state-dir",
            SITE_STATE,
            "--tls-dir",
            TLS_DIR,
        ],
        "env": _env(),
        "securityContext": _container_security(),
        "volumeMounts": mounts,
    }
    resources = _resources(site)
    if resources:
        container["resources"] = resources
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "securityContext": _pod_security(),
        "containers": [container],
        "volumes": volumes,
    }
    if options.node_selector:
        pod_spec["nodeSelector"] = dict(options.node_selector)
    if options.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in options.tolerations]
    if options.priority_class:
        pod_spec["priorityClassName"] = options.priority_class
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": trainer_name(name, site.name),
            "labels": labels(name, "trainer", site.name),
        },
        "spec": {
            "backoffLimit": BACKOFF_LIMIT,
            "completions": 1,
            "parallelism": 1,
            "suspend": blocked,
            "template": {
                "metadata": {"labels": labels(name, "trainer", site.name)},
                "spec": pod_spec,
            },
        },
    }


def build_trainer_network_policy(
    study: FederatedStudy, options: StudyOptions, config: OperatorConfig
) -> Manifest:
    """Trainers accept nothing and reach only DNS and the aggregator's gRPC port."""
    name = study.name
    dns = {
        "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
    }
    to_aggregator: dict[str, Any] = {"ports": [{"protocol": "TCP", "port": GRPC_PORT}]}
    if config.role == "standalone":
        to_aggregator["to"] = [{"podSelector": {"matchLabels": selector(name, "aggregator")}}]
    elif options.aggregator_cidrs:
        to_aggregator["to"] = [{"ipBlock": {"cidr": c}} for c in options.aggregator_cidrs]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": trainer_policy_name(name), "labels": labels(name, "trainer")},
        "spec": {
            "podSelector": {"matchLabels": selector(name, "trainer")},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [],
            "egress": [dns, to_aggregator],
        },
    }


# --- everything --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
    """The children one study should have in this cluster, in creation order."""

    children: list[Manifest]
    sites: list[str]  # the sites whose trainer Job this cluster runs
    config_hash: str


def wanted_sites(study: FederatedStudy, config: OperatorConfig) -> list[str]:
    if config.role == "standalone":
        return [s.name for s in study.spec.sites]
    if config.role == "site" and config.site_name is not None:
        return [s.name for s in study.spec.sites if s.name == config.site_name]
    return []


def build_children(
    body: Mapping[str, Any],
    study: FederatedStudy,
    options: StudyOptions,
    config: OperatorConfig,
    *,
    blocked: bool,
    finished: bool = False,
) -> Plan:
    """Every child this cluster's role wants for the study, owned by it and hashed."""
    namespace = body["metadata"]["namespace"]
    config_map = build_config_map(body)
    config_hash = content_hash(config_map["data"])
    children: list[Manifest] = [config_map]
    if config.runs_aggregator:
        children.append(_pvc(aggregator_state_name(study.name), study.name, "aggregator", options))
        children.extend(build_aggregator_services(study, options))
        children.append(build_aggregator_network_policy(study, options, config, namespace))
        children.append(build_aggregator_deployment(study, options, config_hash, blocked, finished))
    sites = wanted_sites(study, config)
    if sites:
        address = aggregator_address(study, options, config, namespace)
        children.append(build_trainer_network_policy(study, options, config))
        for site_name in sites:
            site = study.spec.site(site_name)
            children.append(
                _pvc(
                    trainer_state_name(study.name, site.name),
                    study.name,
                    "trainer",
                    options,
                    site.name,
                )
            )
            children.append(build_trainer_job(study, site, options, address, blocked))
    kopf.adopt(children, owner=kopf.Body(cast(Any, dict(body))))
    for child in children:
        child["metadata"].setdefault("annotations", {})[APPLIED_HASH] = content_hash(child)
    return Plan(children=children, sites=sites, config_hash=config_hash)
