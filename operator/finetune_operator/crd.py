"""The FineTuneJob CustomResourceDefinition, generated from the pydantic models in api.py.

Kubernetes wants a structural OpenAPI v3 schema, which is not pydantic's JSON Schema: no $ref/$defs,
no anyOf-with-null (nullable instead), exclusiveMinimum as a boolean beside minimum, no titles.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml
from pydantic import BaseModel

from finetune_operator import api

# JSON Schema keys a structural schema keeps, in the order they are written; pydantic's others are dropped.
KEPT_KEYS = (
    "type",
    "description",
    "format",
    "nullable",
    "default",
    "enum",
    "minimum",
    "exclusiveMinimum",
    "maximum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "required",
    "properties",
    "items",
    "additionalProperties",
    "x-kubernetes-preserve-unknown-fields",
)


def structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON Schema rewritten into Kubernetes' structural dialect."""
    schema = model.model_json_schema(by_alias=True, mode="validation")
    definitions = schema.pop("$defs", {})
    return _convert(schema, definitions)


def _convert(node: dict[str, Any], definitions: dict[str, Any]) -> dict[str, Any]:
    node = copy.deepcopy(node)
    if "$ref" in node:
        referenced = definitions[node.pop("$ref").split("/")[-1]]
        node = {**referenced, **node}  # the referring field's description and default win
    if "anyOf" in node:
        variants = [v for v in node.pop("anyOf") if v.get("type") != "null"]
        if len(variants) != 1:
            raise ValueError(f"cannot express a union of {len(variants)} types in a structural schema")
        node = {**_convert(variants[0], definitions), **node, "nullable": True}
    if "allOf" in node and len(node["allOf"]) == 1:
        node = {**node.pop("allOf")[0], **node}
        return _convert(node, definitions)
    if "const" in node:
        node["enum"] = [node.pop("const")]
    for bound in ("exclusiveMinimum", "exclusiveMaximum"):
        if isinstance(node.get(bound), (int, float)) and not isinstance(node.get(bound), bool):
            node["minimum" if bound == "exclusiveMinimum" else "maximum"] = node[bound]
            node[bound] = True
    if node.get("default", 0) is None:
        del node["default"]
    if "enum" in node and "type" not in node:
        node["type"] = "string"
    if "properties" in node:
        node["type"] = "object"
        node["properties"] = {k: _convert(v, definitions) for k, v in node["properties"].items()}
        node.pop("additionalProperties", None)
    elif node.get("type") == "object" or "additionalProperties" in node:
        node["type"] = "object"
        values = node.pop("additionalProperties", {})
        if values in ({}, True) or ("type" not in values and "$ref" not in values):
            node["x-kubernetes-preserve-unknown-fields"] = True
        else:
            node["additionalProperties"] = _convert(values, definitions)
    if node.get("type") == "array":
        node["items"] = _convert(node.get("items", {}), definitions)
    if not node.get("type") and "x-kubernetes-preserve-unknown-fields" not in node:
        node["x-kubernetes-preserve-unknown-fields"] = True
    return {k: node[k] for k in KEPT_KEYS if k in node}


def _default_empty_objects(schema: dict[str, Any]) -> None:
    """Give optional object fields `default: {}` so the API server fills their inner defaults too."""
    for name, prop in schema.get("properties", {}).items():
        if prop.get("type") == "object" and "properties" in prop and not prop.get("nullable"):
            if name not in schema.get("required", []):
                prop.setdefault("default", {})
            _default_empty_objects(prop)


ARGOCD_SYNC_OPTIONS = "argocd.argoproj.io/sync-options"


def build_crd() -> dict[str, Any]:
    spec_schema = structural_schema(api.FineTuneJobSpec)
    _default_empty_objects(spec_schema)
    status_schema = structural_schema(api.FineTuneJobStatus)
    for prop in status_schema["properties"].values():
        prop.pop("default", None)  # status is written by the operator, never defaulted
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        # ArgoCD prunes what left its source and ignores helm.sh/resource-policy; pruning the CRD would delete
        # every FineTuneJob in the cluster. (The chart sets its own annotations, see crds.argocdSyncOptions.)
        "metadata": {"name": f"{api.PLURAL}.{api.GROUP}", "annotations": {ARGOCD_SYNC_OPTIONS: "Prune=false"}},
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": api.SHORT_NAMES,
                "categories": ["all"],
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A LoRA fine-tuning run on a gang of PyTorch workers.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string", "description": "API version."},
                                "kind": {"type": "string", "description": "Kind."},
                                "metadata": {"type": "object"},
                                "spec": {**spec_schema, "description": api.FineTuneJobSpec.__doc__},
                                "status": {**status_schema, "description": "Observed state, written by the operator."},
                            },
                        }
                    },
                }
            ],
        },
    }


PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Current state."},
    {
        "name": "Workers",
        "type": "string",
        "jsonPath": ".status.workers.summary",
        "description": "Worker pods ready / in the gang.",
    },
    {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step", "description": "Optimizer steps done."},
    {
        "name": "Total",
        "type": "integer",
        "jsonPath": ".status.progress.totalSteps",
        "priority": 1,
        "description": "Optimizer steps in the run.",
    },
    {
        "name": "Loss",
        "type": "number",
        "jsonPath": ".status.progress.loss",
        "priority": 1,
        "description": "Recent training loss.",
    },
    {
        "name": "Eval Loss",
        "type": "number",
        "jsonPath": ".status.progress.evalLoss",
        "priority": 1,
        "description": "Loss on the eval set at the latest evaluation.",
    },
    {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts", "description": "Gang restarts."},
    {
        "name": "Reason",
        "type": "string",
        "jsonPath": ".status.reason",
        "description": "Why the job waits or failed: Unschedulable, ImagePullBackOff, Forbidden, StartupTimeout, ...",
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def crd_yaml() -> str:
    return yaml.safe_dump(build_crd(), sort_keys=False, width=120)
