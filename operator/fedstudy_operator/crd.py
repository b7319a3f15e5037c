"""The FederatedStudy CustomResourceDefinition, generated from the study model.

The study model (``fedstudy.spec.FederatedStudy``) is the one source of truth. Its JSON Schema
(pydantic, draft 2020-12) becomes a *structural* OpenAPI v3 schema as Kubernetes wants it:

- ``$ref`` inlined, ``title`` and ``default`` dropped (the model applies its own defaults, so
  the stored document stays what the user wrote), ``additionalProperties: false`` dropped
  (the API server prunes unknown fields; ``kubectl`` reports them with ``--validate=strict``);
- ``anyOf: [X, {type: null}]`` becomes X with ``nullable: true``; ``anyOf`` of integer and
  string becomes ``x-kubernetes-int-or-string``; ``const`` becomes a one-value ``enum``;
- numeric ``exclusiveMinimum: n`` becomes ``minimum: n, exclusiveMinimum: true``;
- ``metadata`` is left to the API server; ``status`` is ours and keeps unknown fields (kopf
  records its progress there).

``fedstudy operator crd`` prints the result; the checked-in copy lives in
``charts/fedstudy/crds/federatedstudies.fedstudy.io.yaml`` and a test fails when they drift.
"""

from __future__ import annotations

from typing import Any

import yaml

from fedstudy.spec import FederatedStudy

GROUP = "fedstudy.io"
VERSION = "v1alpha1"
KIND = "FederatedStudy"
PLURAL = "federatedstudies"
SINGULAR = "federatedstudy"
SHORT_NAMES = ["fstudy"]
CRD_NAME = f"{PLURAL}.{GROUP}"

_DROPPED = {"title", "default", "$defs", "additionalProperties"}
_KEPT = {
    "type",
    "format",
    "description",
    "enum",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "pattern",
}


class SchemaConversionError(ValueError):
    """The model uses a JSON Schema form this converter does not know how to make structural."""


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if ref is None:
        return node
    prefix = "#/$defs/"
    if not isinstance(ref, str) or not ref.startswith(prefix):
        raise SchemaConversionError(f"unsupported $ref {ref!r}")
    target: dict[str, Any] = defs[ref[len(prefix) :]]
    extra = {k: v for k, v in node.items() if k != "$ref"}
    return {**target, **extra}


def _convert(node: dict[str, Any], defs: dict[str, Any], where: str) -> dict[str, Any]:
    node = _resolve(node, defs)
    options = node.get("anyOf") or node.get("oneOf")
    if options is not None:
        return _convert_union(node, options, defs, where)

    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED:
            continue
        if key == "const":
            out["enum"] = [value]
            if "type" not in node:
                out["type"] = _json_type(value, where)
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            out[bound] = value
            out[key] = True
        elif key == "properties":
            out["properties"] = {
                name: _convert(sub, defs, f"{where}.{name}") for name, sub in value.items()
            }
        elif key == "items":
            out["items"] = _convert(value, defs, f"{where}[]")
        elif key == "required":
            out["required"] = list(value)
        elif key in _KEPT:
            out[key] = value
        else:
            raise SchemaConversionError(f"{where}: unsupported JSON Schema keyword {key!r}")

    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        if "properties" in node:
            raise SchemaConversionError(f"{where}: both properties and additionalProperties")
        out["additionalProperties"] = _convert(extra, defs, f"{where}{{}}")
    if "type" not in out:
        raise SchemaConversionError(f"{where}: no type")
    return _ordered(out)


def _ordered(node: dict[str, Any]) -> dict[str, Any]:
    """type and description first, so the YAML reads well."""
    first = [k for k in ("type", "format", "description") if k in node]
    return {k: node[k] for k in [*first, *(k for k in node if k not in first)]}


def _convert_union(
    node: dict[str, Any], options: list[dict[str, Any]], defs: dict[str, Any], where: str
) -> dict[str, Any]:
    resolved = [_resolve(o, defs) for o in options]
    non_null = [o for o in resolved if o.get("type") != "null"]
    nullable = len(non_null) < len(resolved)
    types = sorted(str(o.get("type")) for o in non_null)
    rest = {k: v for k, v in node.items() if k not in ("anyOf", "oneOf")}
    if len(non_null) == 1:
        out = _convert({**non_null[0], **rest}, defs, where)
    elif types == ["integer", "string"] and all(len(o) == 1 for o in non_null):
        out = {k: v for k, v in rest.items() if k == "description"}
        out["x-kubernetes-int-or-string"] = True
    else:
        raise SchemaConversionError(f"{where}: cannot express a union of {types} structurally")
    if nullable:
        out["nullable"] = True
    return out


def _json_type(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, str):
        return "string"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    raise SchemaConversionError(f"{where}: constant of unsupported type {type(value).__name__}")


def _condition_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["type", "status"],
        "properties": {
            "type": {"type": "string"},
            "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
            "reason": {"type": "string"},
            "message": {"type": "string"},
            "lastTransitionTime": {"type": "string", "format": "date-time"},
            "observedGeneration": {"type": "integer"},
        },
    }


def status_schema() -> dict[str, Any]:
    """What the operator writes to ``status`` (kopf adds its own keys, kept as they are)."""
    return {
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
        "properties": {
            "phase": {
                "type": "string",
                "description": "Pending, Running, Succeeded, Failed, Blocked or Invalid.",
            },
            "round": {
                "type": "string",
                "description": "Rounds completed of those planned, e.g. 3/15; empty when unknown.",
            },
            "sites": {
                "type": "string",
                "description": "Sites joined of those listed, e.g. 3/4; ?/4 when unknown.",
            },
            "epsilon": {
                "type": "string",
                "description": "The largest privacy budget spent at a site; empty without DP.",
            },
            "observedGeneration": {"type": "integer"},
            "conditions": {
                "type": "array",
                "items": _condition_schema(),
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
            },
            "aggregator": {
                "type": "object",
                "description": "The aggregator's last /status answer, as observed.",
                "x-kubernetes-preserve-unknown-fields": True,
            },
            "trainers": {
                "type": "object",
                "description": "Each site's trainer Job: Pending, Running, Suspended, "
                "Succeeded or Failed.",
                "additionalProperties": {"type": "string"},
            },
        },
    }


def openapi_schema() -> dict[str, Any]:
    """The structural openAPIV3Schema of a FederatedStudy."""
    full = FederatedStudy.model_json_schema()
    defs: dict[str, Any] = full.get("$defs", {})
    spec = _convert(full["properties"]["spec"], defs, "spec")
    description = (
        "A federated learning study: sites train on their own data and send model updates "
        "to an aggregator, round after round. See docs/kubernetes.md."
    )
    return {
        "type": "object",
        "description": description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status_schema(),
        },
    }


PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Round", "type": "string", "jsonPath": ".status.round"},
    {"name": "Sites", "type": "string", "jsonPath": ".status.sites"},
    {"name": "Epsilon", "type": "string", "jsonPath": ".status.epsilon"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def crd_manifest() -> dict[str, Any]:
    """The CustomResourceDefinition (apiextensions.k8s.io/v1) of FederatedStudy."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/name": "fedstudy"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": ["fedstudy"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [dict(c) for c in PRINTER_COLUMNS],
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


HEADER = (
    "# Generated by `fedstudy operator crd` from the study model (fedstudy/spec.py).\n"
    "# Do not edit: regenerate with\n"
    "#   fedstudy operator crd > charts/fedstudy/crds/federatedstudies.fedstudy.io.yaml\n"
)


def crd_yaml() -> str:
    """The CRD as the YAML text that is checked in (header comment included)."""
    body = yaml.safe_dump(crd_manifest(), sort_keys=False, width=100, allow_unicode=True)
    return HEADER + body
