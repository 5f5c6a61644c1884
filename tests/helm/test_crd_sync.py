"""The chart's derived files match their sources: the CRD (crds/), the values table and the schema (values.yaml).

Fix a failure with `make chart-sync` (python -m finetune_dev.chart_sync), after `make crd` if the API changed.
"""

from __future__ import annotations

import json
from typing import Any

import helm_python as helm
import pytest
import yaml

from finetune_dev.chart_sync import CRD_COPY, CRD_SOURCE, VALUES, ValuesDocError, parse_values_doc, stale_files
from tests.helm.chart import CHART, render


def test_chart_crd_is_a_byte_identical_copy_of_crds_folder():
    assert CRD_COPY.read_bytes() == CRD_SOURCE.read_bytes(), "run `make chart-sync`"


def test_rendered_crd_is_the_source_crd_plus_release_metadata():
    source = yaml.safe_load(CRD_SOURCE.read_text())
    rendered = next(o for o in render() if o["metadata"]["name"] == source["metadata"]["name"])
    assert rendered["apiVersion"] == source["apiVersion"] and rendered["kind"] == source["kind"]
    # The same values of the same types (1.0 stays a float): the API server compares them so when a
    # release takes over a CRD that `kubectl apply -f crds/` created.
    assert json.dumps(rendered["spec"], sort_keys=True) == json.dumps(source["spec"], sort_keys=True)
    assert rendered["metadata"]["annotations"] == {
        "helm.sh/resource-policy": "keep",
        **source["metadata"]["annotations"],
    }
    assert set(rendered["metadata"]) == {"name", "labels", "annotations"}


def test_rendered_crd_carries_the_source_text_verbatim():
    text = CRD_SOURCE.read_text()
    spec_text = text[text.index("\nspec:\n") + 1 :].rstrip()
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render({}, name="finetune", namespace="finetune-system")
    assert spec_text in rendered["finetune-operator/templates/crds.yaml"]


def test_nothing_is_stale():
    assert stale_files() == []


def test_every_key_of_values_yaml_is_documented_and_in_the_table():
    documented = parse_values_doc(VALUES.read_text())  # raises naming an undocumented key
    defaults = yaml.safe_load(VALUES.read_text())
    paths = {value.path for value in documented}
    assert set(_leaf_paths(defaults, {v.path for v in documented if not v.parent})) <= paths
    readme = (CHART / "README.md").read_text()
    for value in documented:
        assert f"| `{value.path}` |" in readme


def test_optional_keys_are_commented_out_and_documented():
    optional = {value.path for value in parse_values_doc(VALUES.read_text()) if value.optional}
    assert optional == {"image.digest", "trainer.image.digest", "priorityClassName"}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("replicaCount: 1\n", "replicaCount has no `# --` comment"),
        ("# -- R.\nresources:\n  cpu: 1\n  # -- M.\n  memory: 2\n", "memory is documented but its map is not a parent"),
        ("# -- Image.\nimage:\n  # -- Repo.\n  repository: x\n  tag: y\n", "image.tag has no `# --` comment"),
    ],
)
def test_undocumented_keys_are_named(text, problem):
    with pytest.raises(ValuesDocError, match=problem.replace("`", ".")):
        parse_values_doc(text)


def test_schema_covers_every_value_and_documents_nothing_extra():
    schema = json.loads((CHART / "values.schema.json").read_text())
    documented = parse_values_doc(VALUES.read_text())
    for value in documented:
        assert _schema_at(schema, value.path) is not None, f"{value.path} is not in values.schema.json"
    documented_paths = {value.path for value in documented}
    for path in _schema_paths(schema, schema):
        if path != "global":
            assert path in documented_paths, f"values.schema.json has {path}, which values.yaml does not document"


def _leaf_paths(tree: dict[str, Any], leaves: set[str], prefix: str = "") -> list[str]:
    paths = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and path not in leaves:
            paths += _leaf_paths(value, leaves, f"{path}.")
        else:
            paths.append(path)
    return paths


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = schema["definitions"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def _schema_at(schema: dict[str, Any], path: str) -> dict[str, Any] | None:
    node = schema
    for part in path.split("."):
        node = _resolve(schema, node).get("properties", {}).get(part)
        if node is None:
            return None
    return node


def _schema_paths(schema: dict[str, Any], node: dict[str, Any], prefix: str = "") -> list[str]:
    """Paths of the properties the schema names (not into free-form objects such as resources)."""
    paths = []
    for key, child in _resolve(schema, node).get("properties", {}).items():
        path = f"{prefix}{key}"
        paths.append(path)
        resolved = _resolve(schema, child)
        if resolved.get("type") == "object" and "properties" in resolved and path not in FREE_FORM_IN_VALUES:
            paths += _schema_paths(schema, resolved, f"{path}.")
    return paths


# Maps values.yaml documents as one value, whose fields the schema still checks one by one.
FREE_FORM_IN_VALUES = {"resources", "healthProbe.livenessProbe", "healthProbe.readinessProbe"}
