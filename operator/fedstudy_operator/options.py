"""Settings of the operator (its command line) and of one study (annotations on the resource).

The study model (``spec``) says *what* to train; where it runs is the business of each
cluster, so deployment settings are annotations with the ``fedstudy.io/`` prefix. Parsing is
pure: a bad value is a problem line ``metadata.annotations["fedstudy.io/x"]: message``, shown
in the study's status like any invalid field.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
from collections.abc import Mapping
from typing import Any, Literal

Role = Literal["standalone", "coordinator", "site"]
ROLES: tuple[Role, ...] = ("standalone", "coordinator", "site")
ServiceType = Literal["ClusterIP", "NodePort", "LoadBalancer"]
SERVICE_TYPES: tuple[ServiceType, ...] = ("ClusterIP", "NodePort", "LoadBalancer")

PREFIX = "fedstudy.io/"
IMAGE = PREFIX + "image"
AGGREGATOR_IMAGE = PREFIX + "aggregator-image"
TRAINER_IMAGE = PREFIX + "trainer-image"
SERVICE_TYPE = PREFIX + "aggregator-service-type"
AGGREGATOR_ADDRESS = PREFIX + "aggregator-address"
AGGREGATOR_CIDRS = PREFIX + "aggregator-cidrs"
GRPC_INGRESS_CIDRS = PREFIX + "grpc-ingress-cidrs"
MONITORING_NAMESPACE = PREFIX + "monitoring-namespace"
NODE_SELECTOR = PREFIX + "node-selector"
TOLERATIONS = PREFIX + "tolerations"
PRIORITY_CLASS = PREFIX + "priority-class"
STORAGE_SIZE = PREFIX + "storage-size"
STORAGE_CLASS = PREFIX + "storage-class"
DATA_PVC = PREFIX + "data-pvc-"  # + site name
DATA_HOSTPATH = PREFIX + "data-hostpath-"  # + site name

DEFAULT_AGGREGATOR_IMAGE = "fedstudy-aggregator:0.1.0"
DEFAULT_TRAINER_IMAGE = "fedstudy-trainer:0.1.0"
DEFAULT_STATUS_URL = "http://{name}.{namespace}.svc:8080/status"

_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})$")
_K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds"}


@dataclasses.dataclass(frozen=True)
class OperatorConfig:
    """How this operator runs: its role and defaults. From the command line."""

    role: Role = "standalone"
    site_name: str | None = None
    aggregator_image: str = DEFAULT_AGGREGATOR_IMAGE
    trainer_image: str = DEFAULT_TRAINER_IMAGE
    # Format string with {name} (the aggregator Service), {namespace} and {study}.
    status_url: str = DEFAULT_STATUS_URL
    # The namespace the operator runs in: its NetworkPolicies let it read /status.
    operator_namespace: str | None = None
    resync_seconds: float = 15.0
    status_timeout_seconds: float = 3.0

    @property
    def runs_aggregator(self) -> bool:
        return self.role in ("standalone", "coordinator")

    @property
    def runs_trainers(self) -> bool:
        return self.role in ("standalone", "site")


@dataclasses.dataclass(frozen=True)
class DataSource:
    """Where a site's data directory comes from: a PVC (the default) or a host path."""

    pvc: str | None = None
    host_path: str | None = None


@dataclasses.dataclass(frozen=True)
class StudyOptions:
    """Per-study deployment settings, read from the FederatedStudy's annotations."""

    aggregator_image: str
    trainer_image: str
    service_type: ServiceType = "ClusterIP"
    aggregator_address: str | None = None
    aggregator_cidrs: tuple[str, ...] = ()
    grpc_ingress_cidrs: tuple[str, ...] = ()
    monitoring_namespace: str | None = None
    node_selector: Mapping[str, str] = dataclasses.field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    priority_class: str | None = None
    storage_size: str = "1Gi"
    storage_class: str | None = None
    data_sources: Mapping[str, DataSource] = dataclasses.field(default_factory=dict)

    def data_source(self, study: str, site: str) -> DataSource:
        return self.data_sources.get(site) or DataSource(pvc=f"{study}-data-{site}")


def _where(key: str) -> str:
    return f'metadata.annotations["{key}"]'


def _cidrs(key: str, value: str, problems: list[str]) -> tuple[str, ...]:
    out = []
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        try:
            out.append(str(ipaddress.ip_network(part, strict=False)))
        except ValueError:
            problems.append(f"{_where(key)}: not a CIDR block: {part!r}")
    return tuple(out)


def _json(key: str, value: str, problems: list[str]) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        problems.append(f"{_where(key)}: not valid JSON: {e.msg} at character {e.pos}")
        return None


def parse_options(
    annotations: Mapping[str, str], config: OperatorConfig, site_names: list[str]
) -> tuple[StudyOptions, list[str]]:
    """The study's deployment settings, and the problems found (empty when all is well)."""
    problems: list[str] = []
    a = dict(annotations)
    image = a.get(IMAGE)
    agg_image = a.get(AGGREGATOR_IMAGE) or image or config.aggregator_image
    trainer_image = a.get(TRAINER_IMAGE) or image or config.trainer_image

    service_type: ServiceType = "ClusterIP"
    raw_type = a.get(SERVICE_TYPE)
    if raw_type is not None:
        for t in SERVICE_TYPES:
            if t.lower() == raw_type.strip().lower():
                service_type = t
                break
        else:
            problems.append(
                f"{_where(SERVICE_TYPE)}: must be one of {', '.join(SERVICE_TYPES)}, "
                f"got {raw_type!r}"
            )

    address = a.get(AGGREGATOR_ADDRESS)
    if address is not None:
        address = address.strip()
        m = _HOST_PORT.match(address)
        if not m or not 0 < int(m.group(2)) < 65536:
            problems.append(
                f"{_where(AGGREGATOR_ADDRESS)}: must be HOST:PORT (e.g. fl.example.org:7700), "
                f"got {address!r}"
            )
    if config.role == "site" and not address:
        problems.append(
            f"{_where(AGGREGATOR_ADDRESS)}: required in site role: the aggregator's external "
            "address, HOST:PORT, that this site's trainer dials"
        )

    node_selector: dict[str, str] = {}
    if NODE_SELECTOR in a:
        value = _json(NODE_SELECTOR, a[NODE_SELECTOR], problems)
        if isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            node_selector = value
        elif value is not None:
            problems.append(
                f"{_where(NODE_SELECTOR)}: must be a JSON object of strings, "
                'e.g. {"nvidia.com/gpu.present": "true"}'
            )

    tolerations: list[dict[str, Any]] = []
    if TOLERATIONS in a:
        value = _json(TOLERATIONS, a[TOLERATIONS], problems)
        if isinstance(value, list) and all(
            isinstance(t, dict) and t and set(t) <= _TOLERATION_KEYS for t in value
        ):
            tolerations = value
        elif value is not None:
            problems.append(
                f"{_where(TOLERATIONS)}: must be a JSON list of tolerations with the keys "
                f"{', '.join(sorted(_TOLERATION_KEYS))}"
            )

    priority_class = a.get(PRIORITY_CLASS)
    if priority_class is not None and not _K8S_NAME.match(priority_class):
        problems.append(f"{_where(PRIORITY_CLASS)}: not a valid name: {priority_class!r}")

    storage_size = a.get(STORAGE_SIZE, "1Gi").strip()
    if not _QUANTITY.match(storage_size):
        problems.append(f"{_where(STORAGE_SIZE)}: not a quantity (e.g. 1Gi): {storage_size!r}")

    monitoring = a.get(MONITORING_NAMESPACE)
    if monitoring is not None and not _K8S_NAME.match(monitoring):
        problems.append(f"{_where(MONITORING_NAMESPACE)}: not a namespace name: {monitoring!r}")

    sources: dict[str, DataSource] = {}
    for key, value in a.items():
        for prefix, make in ((DATA_PVC, "pvc"), (DATA_HOSTPATH, "host")):
            if not key.startswith(prefix):
                continue
            site = key[len(prefix) :]
            if site not in site_names:
                problems.append(f"{_where(key)}: the study lists no site {site!r}")
            elif site in sources:
                problems.append(f"{_where(key)}: site {site!r} has a data PVC and a host path")
            elif make == "pvc":
                if not _K8S_NAME.match(value):
                    problems.append(f"{_where(key)}: not a PVC name: {value!r}")
                sources[site] = DataSource(pvc=value)
            else:
                if not value.startswith("/"):
                    problems.append(f"{_where(key)}: must be an absolute path, got {value!r}")
                sources[site] = DataSource(host_path=value)

    options = StudyOptions(
        aggregator_image=agg_image,
        trainer_image=trainer_image,
        service_type=service_type,
        aggregator_address=address or None,
        aggregator_cidrs=_cidrs(AGGREGATOR_CIDRS, a.get(AGGREGATOR_CIDRS, ""), problems),
        grpc_ingress_cidrs=_cidrs(GRPC_INGRESS_CIDRS, a.get(GRPC_INGRESS_CIDRS, ""), problems),
        monitoring_namespace=monitoring,
        node_selector=node_selector,
        tolerations=tuple(tolerations),
        priority_class=priority_class,
        storage_size=storage_size,
        storage_class=a.get(STORAGE_CLASS) or None,
        data_sources=sources,
    )
    return options, problems
