"""The CRD generated from the models: structural, described, and equal to the committed file."""

from pathlib import Path

import yaml

from finetune_operator.crd import build_crd, crd_yaml

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN_KEYS = {"$ref", "$defs", "anyOf", "allOf", "oneOf", "title", "const"}


def walk(node, path="spec"):
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}")
    if "items" in node:
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def schema():
    return build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_committed_crd_is_the_generated_one():
    committed = (REPO / "crds" / "finetunejobs.finetune.dev.yaml").read_text()
    assert committed == crd_yaml(), "crds/ is stale: run `finetune crd > crds/finetunejobs.finetune.dev.yaml`"


def test_schema_is_structural():
    for path, node in walk(schema()):
        assert not FORBIDDEN_KEYS & node.keys(), path
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), path
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True and "minimum" in node, path
        if "default" in node:
            assert node["default"] is not None, path


def test_every_spec_and_status_field_is_described():
    for section in ("spec", "status"):
        for path, node in walk(schema()["properties"][section], section):
            if not path.endswith(("[]", "}")):
                assert node.get("description"), f"{path} has no description"


def test_api_server_facing_constraints():
    spec = schema()["properties"]["spec"]
    props = spec["properties"]
    assert set(spec["required"]) == {"model", "dataset", "storage"}
    assert props["workers"]["minimum"] == 1
    assert props["lora"]["properties"]["r"]["minimum"] == 1
    dropout = props["lora"]["properties"]["dropout"]
    assert (dropout["minimum"], dropout["maximum"], dropout["exclusiveMaximum"]) == (0, 1, True)
    learning_rate = props["training"]["properties"]["learningRate"]
    assert (learning_rate["minimum"], learning_rate["exclusiveMinimum"]) == (0, True)
    assert props["training"]["properties"]["precision"]["enum"] == ["auto", "bf16", "fp16", "fp32"]
    assert props["training"]["default"] == {}, "nested defaults apply only when the parent is defaulted"


def test_names_columns_and_subresource():
    crd = build_crd()
    assert crd["spec"]["names"]["shortNames"] == ["ftj"]
    assert "all" in crd["spec"]["names"]["categories"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert columns == ["Phase", "Workers", "Step", "Restarts", "Reason", "Age"]
    assert version["additionalPrinterColumns"][0]["jsonPath"] == ".status.phase"
    yaml.safe_load(crd_yaml())


def test_readme_field_table_is_current():
    from finetune_dev.docs import README, readme_with_table

    text = README.read_text()
    assert readme_with_table(text) == text, "README field table is stale: run `python -m finetune_dev.docs`"
