"""Static checks of the two images' Dockerfiles, which need a Docker engine to build (`make images`).

What the chart and the operator rely on: the users the pods run as, the entrypoints, no torch in the
operator, the trainer keeping its base image's torch, and a build context that carries only the package.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import tomllib

from finetune_operator.builders import DEFAULT_COMMAND, POD_SECURITY_CONTEXT
from tests.helm.chart import REPO, render

OPERATOR = REPO / "operator" / "Dockerfile"
TRAINER = REPO / "trainer" / "Dockerfile"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    logical, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, f"{path}: a continuation line ends the file"
    pairs = []
    for text in logical:
        keyword, _, arguments = text.strip().partition(" ")
        pairs.append((keyword.upper(), arguments.strip()))
    return pairs


def last(path: Path, keyword: str) -> str:
    found = [arguments for instruction, arguments in instructions(path) if instruction == keyword]
    assert found, f"{path} has no {keyword}"
    return found[-1]


def final_stage(path: Path) -> list[tuple[str, str]]:
    pairs = instructions(path)
    start = max(i for i, (instruction, _) in enumerate(pairs) if instruction == "FROM")
    return pairs[start:]


@pytest.mark.parametrize("path", [OPERATOR, TRAINER], ids=["operator", "trainer"])
def test_dockerfile_basics(path):
    pairs = instructions(path)
    known = {"FROM", "ARG", "ENV", "RUN", "COPY", "WORKDIR", "USER", "EXPOSE", "ENTRYPOINT", "CMD"}
    assert {instruction for instruction, _ in pairs} <= known
    assert not [a for i, a in pairs if i == "ADD"], "COPY, not ADD"
    assert not [
        a
        for i, a in pairs
        if i == "RUN"
        and re.search(r"\bpip install\b", a)
        and "--no-cache-dir" not in a
        and "PIP_NO_CACHE_DIR=1" not in path.read_text()
    ]
    # Dependencies from pyproject.toml alone are installed before the sources are copied (layer cache).
    copies = [a for i, a in pairs if i == "COPY"]
    assert copies.index("pyproject.toml ./") < copies.index("operator/ operator/")
    for instruction, arguments in pairs:
        if instruction in ("ENTRYPOINT", "CMD"):
            json.loads(arguments)  # exec form: signals reach the process, no shell in between


def test_operator_image():
    assert instructions(OPERATOR)[0] == ("FROM", "python:3.11-slim AS build")
    assert final_stage(OPERATOR)[0] == ("FROM", "python:3.11-slim")
    assert last(OPERATOR, "USER") == "65532:65532"
    assert json.loads(last(OPERATOR, "ENTRYPOINT")) == ["finetune", "operator"]
    text = " ".join(arguments for _, arguments in instructions(OPERATOR))
    assert "torch" not in text and "[trainer]" not in text and "optional-dependencies" not in text
    # The chart runs it as the image's user, with the same command.
    deployment = next(o for o in render() if o["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (65532, 65532)
    assert pod["containers"][0]["command"] == json.loads(last(OPERATOR, "ENTRYPOINT"))
    ports = {port["containerPort"] for port in pod["containers"][0]["ports"]}
    assert ports == {int(p) for p in last(OPERATOR, "EXPOSE").split()}


def test_trainer_image():
    assert re.fullmatch(
        r"PYTORCH_IMAGE=pytorch/pytorch:[\w.]+-cuda[\w.]+-cudnn\d+-runtime",
        next(a for i, a in instructions(TRAINER) if i == "ARG"),
    )
    assert last(TRAINER, "USER") == f"{POD_SECURITY_CONTEXT['runAsUser']}:{POD_SECURITY_CONTEXT['runAsGroup']}"
    assert not [a for i, a in instructions(TRAINER) if i == "ENTRYPOINT"], "spec.command must replace it all"
    assert json.loads(last(TRAINER, "CMD")) == DEFAULT_COMMAND
    env = " ".join(a for i, a in instructions(TRAINER) if i == "ENV")
    assert "HF_HOME=/tmp/huggingface" in env and "HOME=/tmp" in env
    runs = [a for i, a in instructions(TRAINER) if i == "RUN"]
    package_install = [a for a in runs if "pip install --no-deps ." in a]
    assert package_install, "the package goes in with --no-deps, keeping the base image's torch"
    assert any("constraints.txt" in a and "torch==" in a for a in runs)


def test_trainer_installs_every_dependency_but_torch():
    """The requirement filter in trainer/Dockerfile, run here on the real pyproject.toml."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["trainer"]
    kept = [r for r in requirements if re.split(r"[<>=!~;\[ ]", r)[0] != "torch"]
    assert "re.split(r'[<>=!~;\\[ ]', r)[0] != 'torch'" in TRAINER.read_text()
    assert [r for r in requirements if r not in kept] == [
        r for r in requirements if r.startswith("torch") and not r.startswith("torch-")
    ]
    assert any(r.startswith("transformers") for r in kept) and any(r.startswith("peft") for r in kept)


def test_dockerignore_sends_only_the_package():
    lines = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0] == "*"
    assert {line[1:] for line in lines if line.startswith("!")} == {
        "pyproject.toml",
        "README.md",
        "operator/",
        "trainer/",
    }
    for copied in re.findall(r"^COPY (?!--from)(\S+)", OPERATOR.read_text() + TRAINER.read_text(), re.M):
        assert copied in {"pyproject.toml", "README.md", "operator/", "trainer/"}
