"""The README's FineTuneJob field table, generated from the CRD schema (`python -m finetune_dev.docs`)."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from finetune_operator.crd import build_crd

BEGIN, END = "<!-- BEGIN FIELD TABLE -->", "<!-- END FIELD TABLE -->"
README = Path(__file__).resolve().parents[2] / "README.md"


def _rows(node: dict[str, Any], path: str, required: bool) -> list[str]:
    props = node.get("properties")
    if path and (not props or node.get("x-kubernetes-preserve-unknown-fields")):
        return [_row(node, path, required)]
    rows = []
    for name, child in (props or {}).items():
        rows += _rows(child, f"{path}.{name}" if path else name, name in node.get("required", []))
    return rows


def _row(node: dict[str, Any], path: str, required: bool) -> str:
    kind = node.get("type", "object")
    if kind == "array":
        kind = f"[]{node['items'].get('type', 'object')}"
    limits = [f"{'>' if node.get('exclusiveMinimum') else '>='} {node['minimum']}"] if "minimum" in node else []
    if "maximum" in node:
        limits.append(f"{'<' if node.get('exclusiveMaximum') else '<='} {node['maximum']}")
    if "enum" in node:
        limits.append(" \\| ".join(str(v) for v in node["enum"]))
    default = (
        "required" if required else (f"`{node['default']}`" if "default" in node and node["default"] != {} else "")
    )
    description = node.get("description", "").replace("|", "\\|")
    return f"| `{path}` | {kind} | {', '.join(limits)} | {default} | {description} |"


def field_table() -> str:
    spec = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    header = "| field | type | allowed | default | description |\n| --- | --- | --- | --- | --- |"
    return "\n".join([header, *_rows(spec, "", False)])


def readme_with_table(readme: str) -> str:
    block = f"{BEGIN}\n{field_table()}\n{END}"
    return re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, readme, flags=re.S)


if __name__ == "__main__":
    text = README.read_text()
    README.write_text(readme_with_table(text))
    sys.stdout.write(f"updated the field table in {README}\n")
