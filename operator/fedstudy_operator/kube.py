"""A small asynchronous Kubernetes API client for the few kinds the operator manages.

Plain dicts in and out (the builders make plain dicts), aiohttp underneath, so nothing blocks
the event loop. Credentials come from the same place as kopf's: the pod's service account
in a cluster, else the kubeconfig (``KUBECONFIG`` or ``~/.kube/config``). A 401 re-reads them
once (service-account tokens are rotated on disk).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import logging
import os
import ssl
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import kopf

log = logging.getLogger("fedstudy.operator.kube")


@dataclasses.dataclass(frozen=True)
class Resource:
    api_version: str  # "v1", "apps/v1", ...
    plural: str

    def path(self, namespace: str, name: str | None = None, sub: str | None = None) -> str:
        base = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        out = f"{base}/namespaces/{namespace}/{self.plural}"
        if name is not None:
            out += f"/{name}"
        if sub is not None:
            out += f"/{sub}"
        return out


RESOURCES: dict[str, Resource] = {
    "ConfigMap": Resource("v1", "configmaps"),
    "Service": Resource("v1", "services"),
    "PersistentVolumeClaim": Resource("v1", "persistentvolumeclaims"),
    "Deployment": Resource("apps/v1", "deployments"),
    "Job": Resource("batch/v1", "jobs"),
    "NetworkPolicy": Resource("networking.k8s.io/v1", "networkpolicies"),
    "FederatedStudy": Resource("fedstudy.io/v1alpha1", "federatedstudies"),
}


class KubeError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        self.status = status
        self.reason = reason
        self.message = message
        super().__init__(f"{status} {reason}: {message}")


class NotFound(KubeError):
    pass


class Conflict(KubeError):
    pass


def load_connection() -> kopf.ConnectionInfo:
    """The service account's credentials in a pod, else the kubeconfig's current context."""
    settings = kopf.OperatorSettings()
    info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(
        settings=settings
    )
    if info is None:
        raise kopf.LoginError(
            "no Kubernetes credentials: not in a pod with a service account, and no kubeconfig "
            "(set KUBECONFIG or create ~/.kube/config)"
        )
    return info


def _data(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    try:
        return base64.b64decode(raw, validate=True)
    except ValueError:
        return raw


def _ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    if not info.server.startswith("https"):
        return False
    if info.insecure:
        return False
    ctx = ssl.create_default_context()
    if info.ca_path:
        ctx.load_verify_locations(cafile=os.fsdecode(info.ca_path))
    elif info.ca_data:
        ctx.load_verify_locations(cadata=_data(info.ca_data).decode())
    cert = info.certificate_path
    key = info.private_key_path
    if info.certificate_data or info.private_key_data:
        # The ssl module loads client certificates from files only.
        with tempfile.TemporaryDirectory() as tmp:
            if info.certificate_data:
                cert = os.path.join(tmp, "client.crt")
                with open(cert, "wb") as f:
                    f.write(_data(info.certificate_data))
            if info.private_key_data:
                key = os.path.join(tmp, "client.key")
                with open(key, "wb") as f:
                    f.write(_data(info.private_key_data))
            if cert:
                ctx.load_cert_chain(os.fsdecode(cert), os.fsdecode(key) if key else None)
    elif cert:
        ctx.load_cert_chain(os.fsdecode(cert), os.fsdecode(key) if key else None)
    return ctx


class Kube:
    """GET, LIST, POST, merge-PATCH and DELETE of namespaced objects."""

    def __init__(
        self,
        connect: Callable[[], kopf.ConnectionInfo] = load_connection,
        timeout: float = 30.0,
    ) -> None:
        self._connect = connect
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._server = ""
        self._ssl: ssl.SSLContext | bool = False

    async def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            info = self._connect()
            self._server = info.server.rstrip("/")
            self._ssl = _ssl_context(info)
            self._session = aiohttp.ClientSession(
                headers={**info.as_http_headers(), "Accept": "application/json"},
                timeout=self._timeout,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
        retry_auth: bool = True,
    ) -> Any:
        session = await self._open()
        kwargs: dict[str, Any] = {"ssl": self._ssl, "params": params}
        if body is not None:
            kwargs["json"] = body
            kwargs["headers"] = {"Content-Type": content_type}
        async with session.request(method, self._server + path, **kwargs) as resp:
            if resp.status == 401 and retry_auth:
                await self.close()
                return await self._request(
                    method,
                    path,
                    body=body,
                    params=params,
                    content_type=content_type,
                    retry_auth=False,
                )
            try:
                data = await resp.json(content_type=None)
            except (ValueError, aiohttp.ContentTypeError):
                data = None
            if resp.status >= 400:
                reason = resp.reason or ""
                message = ""
                if isinstance(data, dict):
                    reason = str(data.get("reason") or reason)
                    message = str(data.get("message") or "")
                err = {404: NotFound, 409: Conflict}.get(resp.status, KubeError)
                raise err(resp.status, reason, message or f"{method} {path}")
            return data

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            data = await self._request("GET", RESOURCES[kind].path(namespace, name))
        except NotFound:
            return None
        return data if isinstance(data, dict) else None

    async def list(
        self, kind: str, namespace: str, labels: Mapping[str, str]
    ) -> list[dict[str, Any]]:
        """Objects with all the labels (filtered here too: not every server filters)."""
        selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        params = {"labelSelector": selector} if selector else None
        try:
            data = await self._request("GET", RESOURCES[kind].path(namespace), params=params)
        except NotFound:
            return []
        items = data.get("items") if isinstance(data, dict) else None
        out = []
        for item in items or []:
            have = (item.get("metadata") or {}).get("labels") or {}
            if all(have.get(k) == v for k, v in labels.items()):
                out.append(item)
        return out

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        path = RESOURCES[obj["kind"]].path(meta["namespace"])
        data = await self._request("POST", path, body=obj)
        return data if isinstance(data, dict) else dict(obj)

    async def patch(
        self,
        kind: str,
        namespace: str,
        name: str,
        patch: Mapping[str, Any],
        subresource: str | None = None,
    ) -> dict[str, Any]:
        path = RESOURCES[kind].path(namespace, name, subresource)
        data = await self._request(
            "PATCH", path, body=patch, content_type="application/merge-patch+json"
        )
        return data if isinstance(data, dict) else {}

    async def delete(self, kind: str, namespace: str, name: str) -> None:
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        with contextlib.suppress(NotFound):
            await self._request("DELETE", RESOURCES[kind].path(namespace, name), body=body)


StatusProbe = Callable[[str], Awaitable[Any]]


class HttpProbe:
    """Reads a JSON document over HTTP; any failure is None (unknown), never an error."""

    def __init__(self, timeout: float = 3.0) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self, url: str) -> Any:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            async with self._session.get(url) as resp:
                if resp.status != 200:
                    return None
                return await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError, OSError) as e:
            log.debug("status probe failed url=%s error=%r", url, e)
            return None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
