"""Test support for the operator: kmock's KubernetesEmulator with its 0.8 gaps filled, studies.

The gaps (see shared TESTING-K8S.md), each closed here rather than in the operator:
- create assigns uid, resourceVersion, creationTimestamp, generation and honours generateName;
- every change bumps resourceVersion (a JSON patch's ``test`` op on it then works); a spec
  change bumps generation;
- a JSON patch whose ``test`` fails answers 422, as the API server does;
- list answers carry ``apiVersion`` and ``kind`` (kubectl refuses them otherwise);
- the core group is announced as ``v1``, not ``/v1``;
- built-in kinds are discoverable with their kinds, and a CRD created through the API makes
  its resource discoverable;
- deleting an object deletes what it owns (a tiny garbage collector, background cascade).
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import itertools
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import jsonpatch
import jsonpointer
import yaml
from kmock._internal import dicts as kdicts
from kmock._internal import enums, k8s, references, rendering

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
CRD_FILE = ROOT / "charts" / "fedstudy" / "crds" / "federatedstudies.fedstudy.io.yaml"

BUILTIN: dict[str, tuple[str, bool, tuple[str, ...], tuple[str, ...]]] = {
    # "group/version/plural": (kind, namespaced, subresources, short names)
    "v1/namespaces": ("Namespace", False, (), ("ns",)),
    "v1/configmaps": ("ConfigMap", True, (), ("cm",)),
    "v1/services": ("Service", True, ("status",), ("svc",)),
    "v1/persistentvolumeclaims": ("PersistentVolumeClaim", True, ("status",), ("pvc",)),
    "v1/events": ("Event", True, (), ("ev",)),
    "v1/pods": ("Pod", True, ("status",), ("po",)),
    "apps/v1/deployments": ("Deployment", True, ("status", "scale"), ("deploy",)),
    "batch/v1/jobs": ("Job", True, ("status",), ()),
    "networking.k8s.io/v1/networkpolicies": ("NetworkPolicy", True, (), ("netpol",)),
    "apiextensions.k8s.io/v1/customresourcedefinitions": (
        "CustomResourceDefinition",
        False,
        ("status",),
        ("crd", "crds"),
    ),
}
VERBS = {"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"}


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@attrs.define(kw_only=True)
class FedEmulator(k8s.KubernetesEmulator):
    """KubernetesEmulator with the metadata, discovery and cascade a real server has."""

    _versions: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1), init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for key, (kind, namespaced, subs, short) in BUILTIN.items():
            self.resources[key] = references.ResourceInfo(
                kind=kind,
                namespaced=namespaced,
                singular=kind.lower(),
                verbs=VERBS,
                subresources=set(subs),
                shortnames=set(short),
            )

    # --- object bookkeeping --------------------------------------------------------------

    def _find(self, request: rendering.Request) -> Any:
        key = (request.resource, request.namespace, request.name)
        for k, obj in self.objects.items():
            if k == key and not obj.deleted:
                return obj
        return None

    def _prepare(self, request: rendering.Request) -> None:
        if request.resource is None:
            return
        if request.action == enums.action.CREATE and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
            if request.namespace and not meta.get("namespace"):
                info = self.resources.get(request.resource)
                if info is None or info.namespaced is not False:
                    meta["namespace"] = request.namespace
            meta["uid"] = str(uuid.uuid4())
            meta["resourceVersion"] = str(next(self._versions))
            meta["creationTimestamp"] = _now()
            meta["generation"] = 1
        elif request.action == enums.action.UPDATE and request.name is not None:
            current = self._find(request)
            if current is None:
                return
            version = str(next(self._versions))
            generation = int(current.get("metadata", {}).get("generation") or 1)
            if isinstance(request.data, dict):
                meta = request.data.setdefault("metadata", {})
                meta["resourceVersion"] = version
                spec_patch = request.data.get("spec")
                if isinstance(spec_patch, dict) and request.subresource != "status":
                    spec = dict(current.get("spec") or {})
                    if dict(kdicts.patch_dict(spec, spec_patch)) != spec:
                        meta["generation"] = generation + 1
            elif isinstance(request.data, list):
                touches_spec = any(
                    str(op.get("path", "")).startswith("/spec") for op in request.data
                )
                request.data.append(
                    {"op": "add", "path": "/metadata/resourceVersion", "value": version}
                )
                if touches_spec and request.subresource != "status":
                    request.data.append(
                        {"op": "add", "path": "/metadata/generation", "value": generation + 1}
                    )

    async def _handle(self, request: rendering.Request) -> Any:
        self._prepare(request)
        try:
            response = await super()._handle(request)
        except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as e:
            raise k8s.KubernetesError(status=422, reason="Invalid", message=str(e)) from e
        if request.resource is not None and request.action == enums.action.CREATE:
            self._register_crd(request)
        if request.action in (enums.action.DELETE, enums.action.UPDATE):
            await self._collect_garbage()
        return response

    def _register_crd(self, request: rendering.Request) -> None:
        data = request.data if isinstance(request.data, dict) else {}
        if data.get("kind") != "CustomResourceDefinition":
            return
        spec = data.get("spec") or {}
        names = spec.get("names") or {}
        for v in spec.get("versions") or []:
            self.resources[f"{spec['group']}/{v['name']}/{names['plural']}"] = (
                references.ResourceInfo(
                    kind=names.get("kind"),
                    singular=names.get("singular"),
                    namespaced=spec.get("scope") == "Namespaced",
                    verbs=VERBS,
                    shortnames=set(names.get("shortNames") or []),
                    categories=set(names.get("categories") or []),
                    subresources=set((v.get("subresources") or {}).keys()),
                )
            )

    async def _collect_garbage(self) -> None:
        """Deletes objects whose every owner is gone (no finalizers on children here)."""
        while True:
            async with self._lock:
                live = {
                    obj.get("metadata", {}).get("uid")
                    for obj in self.objects.values()
                    if not obj.deleted
                }
                orphans = []
                for key, obj in self.objects.items():
                    if obj.deleted:
                        continue
                    refs = obj.get("metadata", {}).get("ownerReferences") or []
                    if refs and not any(r.get("uid") in live for r in refs):
                        orphans.append((key, obj))
                for key, obj in orphans:
                    raw = obj.raw
                    obj.delete()
                    await self._buses[key[0]].put({"type": "DELETED", "object": raw})
            if not orphans:
                return

    # --- discovery and lists ---------------------------------------------------------------

    async def _serve_version(self, request: rendering.Request) -> rendering.Payload:
        payload = await super()._serve_version(request)
        if isinstance(payload, dict):
            if str(payload.get("groupVersion", "")).startswith("/"):
                payload["groupVersion"] = payload["groupVersion"][1:]
            for entry in payload.get("resources") or []:
                if "/" in entry.get("name", ""):  # subresources have no short names
                    entry["shortNames"] = []
                    entry["categories"] = []
        return payload

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        payload = await super()._serve_list(request)
        resource = request.resource
        if isinstance(payload, dict) and resource is not None:
            info = self.resources.get(resource)
            kind = info.kind if info is not None and info.kind else None
            gv = f"{resource.group}/{resource.version}" if resource.group else resource.version
            payload["apiVersion"] = gv
            payload["kind"] = f"{kind}List" if kind else "List"
            payload["metadata"] = {"resourceVersion": str(next(self._versions))}
            selector = request.params.get("labelSelector") if request.params else None
            if selector:
                payload["items"] = [i for i in payload["items"] if _matches(i, selector)]
        return payload

    # --- test helpers ------------------------------------------------------------------------

    def live(self, resource: str, namespace: str | None = None) -> list[dict[str, Any]]:
        """The live objects of a resource ("batch/v1/jobs"), optionally of one namespace."""
        wanted = references.resource(resource)
        out = []
        for (res, ns, _), obj in self.objects.items():
            if res == wanted and not obj.deleted and (namespace is None or ns == namespace):
                out.append(copy.deepcopy(dict(obj.raw)))
        return out

    def get(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        for obj in self.live(resource, namespace):
            if obj["metadata"]["name"] == name:
                return obj
        return None


def _matches(obj: Mapping[str, Any], selector: str) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if (labels.get(key) != value) if value else (key not in labels):
            return False
    return True


def write_kubeconfig(path: Path, server: str, namespace: str = "default") -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "emulator", "cluster": {"server": server}}],
        "users": [{"name": "tester", "user": {"token": "test-token"}}],
        "contexts": [
            {
                "name": "emulator",
                "context": {"cluster": "emulator", "user": "tester", "namespace": namespace},
            }
        ],
        "current-context": "emulator",
    }
    path.write_text(yaml.safe_dump(config))
    return path


def example(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())
    return doc


def study(
    name: str = "heart",
    sites: int = 2,
    *,
    namespace: str | None = "default",
    annotations: Mapping[str, str] | None = None,
    irb_until: str | None = None,
    gpu: int = 0,
    data: str = "csv",
) -> dict[str, Any]:
    """A small valid FederatedStudy document."""
    site_list = []
    for i in range(sites):
        site: dict[str, Any] = {"name": f"site{i}"}
        if data == "csv":
            site["data"] = {"format": "csv", "path": f"/data/site{i}.csv"}
        else:
            site["data"] = {
                "format": "builtin",
                "dataset": "breast-cancer",
                "partition": {"index": i, "count": sites},
            }
        if gpu:
            site["resources"] = {"gpu": gpu, "cpu": "2", "memory": "4Gi"}
        site_list.append(site)
    spec: dict[str, Any] = {
        "task": {"label": "target"},
        "model": {"name": "mlp", "hidden": [8]},
        "rounds": 3,
        "minSites": 1,
        "sites": site_list,
    }
    if irb_until is not None:
        spec["governance"] = {"irb": {"protocol": "IRB-2026-0142", "approvedUntil": irb_until}}
    meta: dict[str, Any] = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    if annotations:
        meta["annotations"] = dict(annotations)
    return {
        "apiVersion": "fedstudy.io/v1alpha1",
        "kind": "FederatedStudy",
        "metadata": meta,
        "spec": spec,
    }


async def wait_for(
    check: Callable[[], Any] | Callable[[], Awaitable[Any]],
    timeout: float = 10.0,
    what: str = "condition",
) -> Any:
    """Polls ``check`` until it returns something truthy; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
