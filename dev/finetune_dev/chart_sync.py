"""Keep the chart's derived files in step with their sources: the CRD copy and the README's values table.

    python -m finetune_dev.chart_sync           # rewrite both (make chart-sync)
    python -m finetune_dev.chart_sync --check   # exit 1 naming what is stale (tests/helm/test_crd_sync.py)

The CRD's source is crds/ (itself `finetune crd`, generated from the API models); the chart keeps a
byte-identical copy in files/crds/ that templates/crds.yaml renders. The values table is generated
from values.yaml's `# --` comments, as helm-docs does, between two markers in the chart's README.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "finetune-operator"
CRD_SOURCE = REPO / "crds" / "finetunejobs.finetune.dev.yaml"
CRD_COPY = CHART / "files" / "crds" / "finetunejobs.finetune.dev.yaml"
VALUES = CHART / "values.yaml"
README = CHART / "README.md"
TABLE_START = "<!-- values-table:start (generated from values.yaml by `make chart-sync`) -->"
TABLE_END = "<!-- values-table:end -->"

_DOC = re.compile(r"^(?P<indent> *)# -- (?P<text>.*)$")
_CONTINUATION = re.compile(r"^(?P<indent> *)#(?: (?P<text>.*))?$")
_COMMENTED_KEY = re.compile(r"^(?P<indent> *)# (?P<key>[A-Za-z][A-Za-z0-9]*):(?P<rest>.*)$")
_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z][A-Za-z0-9]*):(?P<rest>.*)$")


@dataclass
class Value:
    """One documented key of values.yaml."""

    path: str
    description: str
    default: Any
    optional: bool  # commented out: unset unless given
    parent: bool = False  # a map whose keys are documented one by one


class ValuesDocError(ValueError):
    """values.yaml breaks the documentation convention; the message names the line."""


def parse_values_doc(text: str) -> list[Value]:
    """Every key of values.yaml with its `# --` description, including the commented-out optional keys.

    A map whose own keys carry `# --` comments is a parent (its keys are rows of their own); a map whose
    keys carry none is one value (e.g. resources). Every key outside such a value must be documented.
    """
    defaults = yaml.safe_load(text) or {}
    lines = text.splitlines()
    values: list[Value] = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the maps enclosing the current line
    pending: list[str] | None = None  # description lines waiting for their key
    leaf_indent: int | None = None  # inside an undocumented value map: keys deeper than this are its body
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        doc, key, commented = _DOC.match(line), _KEY.match(line), _COMMENTED_KEY.match(line)
        if doc:
            pending = [doc["text"].strip()]
            continue
        if pending is not None and commented:
            indent = len(commented["indent"])
            path = _path(stack, indent, commented["key"])
            values.append(Value(path, " ".join(pending), _scalar(commented["rest"]), optional=True))
            pending = None
            continue
        if pending is not None and (continuation := _CONTINUATION.match(line)):
            pending.append((continuation["text"] or "").strip())
            continue
        if line.lstrip().startswith("#"):
            pending = None
            continue
        if not key:
            if leaf_indent is not None:
                continue  # a list item inside an undocumented value
            raise ValuesDocError(f"values.yaml:{number}: cannot parse {line!r}")
        indent = len(key["indent"])
        if leaf_indent is not None and indent > leaf_indent:
            if pending is not None:
                raise ValuesDocError(f"values.yaml:{number}: {key['key']} is documented but its map is not a parent")
            continue
        leaf_indent = None
        path = _path(stack, indent, key["key"])
        if pending is None:
            raise ValuesDocError(f"values.yaml:{number}: {path} has no `# --` comment")
        default = _lookup(defaults, path)
        is_map = isinstance(default, dict) and bool(default)
        documented_children = is_map and _next_key_is_documented(lines, number)
        values.append(Value(path, " ".join(pending), default, optional=False, parent=documented_children))
        pending = None
        if is_map:
            stack.append((indent, key["key"]))
            if not documented_children:
                leaf_indent = indent
                stack.pop()
    return values


def _path(stack: list[tuple[int, str]], indent: int, key: str) -> str:
    while stack and stack[-1][0] >= indent:
        stack.pop()
    return ".".join([*(k for _, k in stack), key])


def _lookup(tree: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        tree = tree[part]
    return tree


def _scalar(rest: str) -> Any:
    return yaml.safe_load(rest) if rest.strip() else None


def _next_key_is_documented(lines: list[str], number: int) -> bool:
    """Whether the first key inside the map opened on line `number` (1-based) has a `# --` comment."""
    for line in lines[number:]:
        if line.strip():
            return bool(_DOC.match(line))
    return False


def values_table(values: list[Value]) -> str:
    rows = ["| Key | Type | Default | Description |", "| --- | --- | --- | --- |"]
    for value in values:
        if value.parent:
            kind, default = "object", ""
        else:
            kind = _type_name(value.default)
            example = f"`{json.dumps(value.default)}`"
            default = f"unset (e.g. {example})" if value.optional else example
        description = value.description.replace("|", "\\|")
        rows.append(f"| `{value.path}` | {kind} | {default} | {description} |")
    return "\n".join(rows)


def _type_name(default: Any) -> str:
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, int):
        return "int"
    if isinstance(default, float):
        return "float"
    if isinstance(default, list):
        return "list"
    if isinstance(default, dict):
        return "object"
    return "string"


def readme_with_table(readme: str, table: str) -> str:
    start, end = readme.find(TABLE_START), readme.find(TABLE_END)
    if start < 0 or end < start:
        raise ValuesDocError(f"{README} lacks the markers {TABLE_START!r} ... {TABLE_END!r}")
    return readme[: start + len(TABLE_START)] + "\n" + table + "\n" + readme[end:]


def stale_files() -> list[str]:
    """What is out of step, each with the command that fixes it; empty when all is in sync."""
    problems = []
    if not CRD_COPY.exists() or CRD_COPY.read_bytes() != CRD_SOURCE.read_bytes():
        problems.append(f"{CRD_COPY.relative_to(REPO)} differs from {CRD_SOURCE.relative_to(REPO)}")
    table = values_table(parse_values_doc(VALUES.read_text()))
    readme = README.read_text()
    if readme_with_table(readme, table) != readme:
        problems.append(f"the values table in {README.relative_to(REPO)} is not generated from values.yaml")
    return problems


def write() -> None:
    CRD_COPY.parent.mkdir(parents=True, exist_ok=True)
    CRD_COPY.write_bytes(CRD_SOURCE.read_bytes())
    table = values_table(parse_values_doc(VALUES.read_text()))
    README.write_text(readme_with_table(README.read_text(), table))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune_dev.chart_sync", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report what is stale; exit 1 if anything is")
    args = parser.parse_args(argv)
    if not args.check:
        write()
    problems = stale_files()
    for problem in problems:
        print(f"{problem}: run `make chart-sync`", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
