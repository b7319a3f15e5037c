"""The CRD: generated from the study model, structural, valid, and checked in without drift."""

from __future__ import annotations

import copy
import subprocess
import sys
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from fedop_support import CRD_FILE, EXAMPLES, study
from fedstudy_operator import crd

ALLOWED_UNTYPED = ("x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields")


def test_checked_in_crd_matches_the_model() -> None:
    want = crd.crd_yaml()
    have = CRD_FILE.read_text()
    assert have == want, (
        "the checked-in CRD drifted from fedstudy/spec.py; regenerate it with\n"
        "  fedstudy operator crd > charts/fedstudy/crds/federatedstudies.fedstudy.io.yaml"
    )


def test_fedstudy_operator_crd_prints_it() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fedstudy", "operator", "crd"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out == CRD_FILE.read_text()


@pytest.mark.parametrize("version", ["1.30", kubernetes_validate.latest_version()])
def test_crd_is_a_valid_apiextensions_v1_object(version: str) -> None:
    kubernetes_validate.validate(yaml.safe_load(CRD_FILE.read_text()), version, strict=True)


def _walk(node: dict[str, Any], path: str, out: list[str]) -> None:
    for bad in ("$ref", "$defs", "allOf", "oneOf", "not", "const", "title", "default"):
        if bad in node:
            out.append(f"{path}: {bad}")
    if "anyOf" in node:
        out.append(f"{path}: anyOf")
    if "type" not in node and not any(node.get(k) for k in ALLOWED_UNTYPED):
        out.append(f"{path}: no type")
    if node.get("additionalProperties") is False:
        out.append(f"{path}: additionalProperties false")
    if "properties" in node and "additionalProperties" in node:
        out.append(f"{path}: properties and additionalProperties")
    for key in ("exclusiveMinimum", "exclusiveMaximum"):
        if key in node and not isinstance(node[key], bool):
            out.append(f"{path}: numeric {key}")
    for name, sub in (node.get("properties") or {}).items():
        _walk(sub, f"{path}.{name}", out)
    if isinstance(node.get("items"), dict):
        _walk(node["items"], f"{path}[]", out)
    if isinstance(node.get("additionalProperties"), dict):
        _walk(node["additionalProperties"], f"{path}{{}}", out)


def test_schema_is_structural() -> None:
    problems: list[str] = []
    schema = crd.openapi_schema()
    _walk(schema, "", problems)
    assert problems == []
    assert schema["properties"]["metadata"] == {"type": "object"}
    status = schema["properties"]["status"]
    assert status["x-kubernetes-preserve-unknown-fields"] is True
    # Only status keeps unknown fields (and the aggregator's answer inside it).
    text = yaml.safe_dump(schema["properties"]["spec"])
    assert "preserve-unknown-fields" not in text


def test_names_scope_subresource_and_printer_columns() -> None:
    doc = yaml.safe_load(CRD_FILE.read_text())
    assert doc["metadata"]["name"] == "federatedstudies.fedstudy.io"
    spec = doc["spec"]
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["shortNames"] == ["fstudy"]
    assert spec["names"]["kind"] == "FederatedStudy"
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1"
    assert version["served"]
    assert version["storage"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert list(columns) == ["Phase", "Round", "Sites", "Epsilon", "Age"]
    assert columns["Phase"]["jsonPath"] == ".status.phase"
    assert columns["Round"]["jsonPath"] == ".status.round"
    assert columns["Sites"]["jsonPath"] == ".status.sites"
    assert columns["Epsilon"]["jsonPath"] == ".status.epsilon"
    assert columns["Age"] == {
        "name": "Age",
        "type": "date",
        "jsonPath": ".metadata.creationTimestamp",
    }


def _as_json_schema(node: Any) -> Any:
    """OpenAPI v3.0 (nullable, int-or-string) to JSON Schema draft 4 for checking documents."""
    if isinstance(node, list):
        return [_as_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _as_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes")}
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if out.pop("nullable", False):
        out["type"] = [out["type"], "null"] if isinstance(out["type"], str) else out["type"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    if isinstance(node.get("properties"), dict):
        out["properties"] = {k: _as_json_schema(v) for k, v in node["properties"].items()}
    return out


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_examples_pass_the_crd_schema(path: Any) -> None:
    schema = _as_json_schema(crd.openapi_schema())
    jsonschema.Draft4Validator(schema).validate(yaml.safe_load(path.read_text()))


@pytest.mark.parametrize(
    ("change", "where"),
    [
        (lambda d: d["spec"].__setitem__("rounds", 0), "rounds"),
        (lambda d: d["spec"]["model"].__setitem__("name", "transformer"), "name"),
        (lambda d: d["spec"]["sites"][0]["data"].__setitem__("format", "xls"), "format"),
        (lambda d: d["spec"]["training"].__setitem__("learningRate", 0), "learningRate"),
    ],
)
def test_the_crd_schema_refuses_what_the_model_refuses(change: Any, where: str) -> None:
    doc = copy.deepcopy(study())
    doc["spec"]["training"] = {"learningRate": 0.1}
    change(doc)
    schema = _as_json_schema(crd.openapi_schema())
    with pytest.raises(jsonschema.ValidationError) as err:
        jsonschema.Draft4Validator(schema).validate(doc)
    assert where in "/".join(map(str, err.value.absolute_path))
