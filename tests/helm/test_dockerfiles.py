"""The two images' Dockerfiles: static checks, then the images themselves as finetune_dev.images builds them.

What the chart and the operator rely on: the users the pods run as, the entrypoints, each role's own
dependencies at the lock's versions (the trainer's torch build chosen by TORCH_VARIANT, CUDA checked here
statically, CPU built), and a build context that carries only the package and the lock.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from finetune_dev import images
from finetune_dev.cluster.errors import ClusterError
from finetune_operator.builders import DEFAULT_COMMAND, POD_SECURITY_CONTEXT
from tests.helm.chart import REPO, render

OPERATOR = REPO / "operator" / "Dockerfile"
TRAINER = REPO / "trainer" / "Dockerfile"
LOCK = "constraints.txt"
CONTEXT = {"pyproject.toml", "README.md", LOCK, "operator/", "trainer/"}


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
    # The base is a build argument defaulting to the public image; both stages use it (same python for the venv).
    assert pairs[0] == ("ARG", "BASE=python:3.11-slim-bookworm")
    assert [a for i, a in pairs if i == "FROM"] == ["${BASE} AS build", "${BASE}"]
    assert "PIP_NO_CACHE_DIR=1" in " ".join(a for i, a in pairs if i == "ENV")
    # Every dependency install is constrained by the lock; the package itself goes in without dependencies.
    for run in (a for i, a in pairs if i == "RUN" and "pip install" in a):
        for install in re.findall(r"pip install [^&|;]*", run):
            assert f"-c {LOCK}" in install or install.strip() == "pip install --no-deps .", install
    # The package's build backend (setuptools, in an isolated build environment) is locked too.
    assert f"PIP_CONSTRAINT=/src/{LOCK} pip install --no-deps ." in " ".join(a for i, a in pairs if i == "RUN")
    # The final stage runs nothing (a RUN there would keep the build's bind mount points): base, users, venv.
    assert not [a for i, a in final_stage(path) if i == "RUN"]
    assert ("COPY", "--from=build /etc/passwd /etc/group /etc/") in final_stage(path)
    build_stage = pairs[: [i for i, _ in pairs].index("FROM", 2)]
    leftovers = "pip setuptools" if path == OPERATOR else "pip"  # torch needs setuptools
    assert [a for i, a in build_stage if i == "RUN"][-1].endswith(f"pip uninstall --yes {leftovers}")
    # Dependencies from pyproject.toml and the lock alone are installed before the sources are copied (layer cache).
    copies = [a for i, a in pairs if i == "COPY"]
    assert copies.index(f"pyproject.toml {LOCK} ./") < copies.index("operator/ operator/")
    for instruction, arguments in pairs:
        if instruction in ("ENTRYPOINT", "CMD"):
            json.loads(arguments)  # exec form: signals reach the process, no shell in between


def test_operator_image():
    assert last(OPERATOR, "USER") == "65532:65532"
    assert json.loads(last(OPERATOR, "ENTRYPOINT")) == ["finetune", "operator"]
    text = " ".join(arguments for _, arguments in instructions(OPERATOR))
    assert "torch" not in text and "['trainer']" not in text and "['operator']" in text
    # The chart runs it as the image's user, with the same command.
    deployment = next(o for o in render() if o["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (65532, 65532)
    assert pod["containers"][0]["command"] == json.loads(last(OPERATOR, "ENTRYPOINT"))
    ports = {port["containerPort"] for port in pod["containers"][0]["ports"]}
    assert ports == {int(p) for p in last(OPERATOR, "EXPOSE").split()}


def test_trainer_image():
    assert ("ARG", "TORCH_VARIANT=cuda") in instructions(TRAINER)
    assert last(TRAINER, "USER") == f"{POD_SECURITY_CONTEXT['runAsUser']}:{POD_SECURITY_CONTEXT['runAsGroup']}"
    assert not [a for i, a in instructions(TRAINER) if i == "ENTRYPOINT"], "spec.command must replace it all"
    assert json.loads(last(TRAINER, "CMD")) == DEFAULT_COMMAND
    env = " ".join(a for i, a in instructions(TRAINER) if i == "ENV")
    assert "HF_HOME=/tmp/huggingface" in env and "HOME=/tmp" in env
    text = " ".join(arguments for _, arguments in instructions(TRAINER))
    assert "['trainer']" in text and "['operator']" not in text


def test_chart_and_operator_default_to_the_local_image_refs():
    refs = images.image_refs()
    deployment = next(o for o in render() if o["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == refs["operator"]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert env["FINETUNE_OPERATOR_TRAINER_IMAGE"] == refs["trainer"]
    from finetune_operator.config import OperatorSettings

    assert OperatorSettings.model_fields["trainer_image"].default == refs["trainer"]


def torch_step(variant: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """The trainer's torch RUN step under sh, in a folder holding the lock, with a `pip` that prints its input."""
    step = next(a for i, a in instructions(TRAINER) if i == "RUN" and "TORCH_VARIANT" in a)
    shutil.copy(REPO / LOCK, tmp_path / LOCK)
    fake = tmp_path / "bin" / "pip"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text('#!/bin/sh\necho "find-links=${PIP_FIND_LINKS-unset} index=${PIP_INDEX_URL-pypi} $*"\n')
    fake.chmod(0o755)
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin", "TORCH_VARIANT": variant, "PIP_FIND_LINKS": "/opt/wheels"}
    return subprocess.run(["sh", "-c", step], cwd=tmp_path, env=env, capture_output=True, text=True)


def test_trainer_torch_variants(tmp_path):
    """The CUDA variant (too large to build in CI) installs PyPI's own wheel of the lock's torch version."""
    locked = re.search(r"^torch==(\S+)$", (REPO / LOCK).read_text(), re.M).group(1)
    cuda = torch_step("cuda", tmp_path)
    assert cuda.returncode == 0, cuda.stderr
    # PyPI's torch for Linux is the CUDA build (its nvidia-* wheels carry the runtime): no local wheels,
    # no other index, no local version label.
    assert cuda.stdout.strip() == f"find-links=unset index=pypi install -c {LOCK} torch=={locked}"
    assert "download.pytorch.org" not in TRAINER.read_text().split("cuda)")[1].split(";;")[0]
    cpu = torch_step("cpu", tmp_path)
    assert cpu.stdout.strip() == f"find-links=/opt/wheels index=pypi install -c {LOCK} torch=={locked}+cpu"
    wrong = torch_step("rocm", tmp_path)
    assert (
        wrong.returncode == 2 and "TORCH_VARIANT must be cuda, cu130, cu128, cu126 or cpu, not 'rocm'" in wrong.stderr
    )


def torch_variants() -> list[str]:
    """The variants the trainer's torch step knows: the labels of its case arms."""
    step = next(a for i, a in instructions(TRAINER) if i == "RUN" and "TORCH_VARIANT" in a)
    return [v for arm in re.findall(r"\s([a-z0-9|]+)\) ", step) for v in arm.split("|")]


@pytest.mark.parametrize("variant", ["cu130", "cu128", "cu126"])
def test_cuda_variants_pin_the_locked_torch_from_their_own_index(tmp_path, variant):
    """The CUDA 12 and 13 builds cannot be installed on these machines (nor downloaded): what pip is asked
    for is checked instead. The lock's version with the variant's local label, from the index of that CUDA
    release alone (no local wheels), so a mirror of PyPI cannot slip in another build."""
    locked = re.search(r"^torch==(\S+)$", (REPO / LOCK).read_text(), re.M).group(1)
    step = torch_step(variant, tmp_path)
    assert step.returncode == 0, step.stderr
    index = f"--extra-index-url=https://download.pytorch.org/whl/{variant}"
    assert step.stdout.strip() == f"find-links=unset index=pypi install -c {LOCK} {index} torch=={locked}+{variant}"


def test_readme_gives_each_variant_its_minimum_driver():
    readme = (REPO / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)`(?: \(default\))? \|.*\| ([^|]+) \|$", readme, re.M))
    assert set(torch_variants()) <= set(rows), "a TORCH_VARIANT without its row in README.md"
    for variant in torch_variants():
        driver = rows[variant].strip()
        if variant == "cpu":
            assert driver == "none"
        else:
            assert re.match(r"^\d{3}\.\d+\.\d+", driver), (variant, driver)
    assert rows["cu128"].startswith("525.") and rows["cuda"].startswith("580."), "CUDA 12 runs on 535-570 fleets"


def test_dockerignore_sends_only_the_package_and_the_lock():
    lines = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0] == "*"
    assert {line[1:] for line in lines if line.startswith("!")} == CONTEXT
    for copied in re.findall(r"^COPY (?!--from)(.+) \S+$", OPERATOR.read_text() + TRAINER.read_text(), re.M):
        assert set(copied.split()) <= CONTEXT
    # Each image's inputs: its own Dockerfile and what the context sends (not the other image's Dockerfile).
    sent = {str(p.relative_to(REPO)) for p in images.context_files()}
    assert not {"operator/Dockerfile", "trainer/Dockerfile"} & sent and "operator/finetune_operator/cli.py" in sent
    assert {name.split("/")[0] for name in sent} == {c.rstrip("/") for c in CONTEXT} | {".dockerignore"}


def test_build_passes_the_hosts_pip_settings_in(tmp_path, monkeypatch):
    """Inside a build pip sees none of the host's configuration: images.py passes it as build args and mounts."""
    wheels, cert = tmp_path / "wheels", tmp_path / "ca.pem"
    wheels.mkdir()
    cert.write_text("")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv("PIP_CERT", str(cert))
    monkeypatch.setenv("PIP_INDEX_URL", "file:///nowhere/simple")
    args, volumes = images.pip_settings()
    assert args["PIP_FIND_LINKS"] == str(wheels) and args["PIP_CERT"] == str(cert)
    assert "PIP_INDEX_URL" not in args, "a local index is not in the build: PyPI then"
    assert sorted(volumes) == sorted([f"{wheels}:{wheels}:ro", f"{cert}:{cert}:ro"])
    declared = {a.partition("=")[0] for i, a in instructions(TRAINER) if i == "ARG"}
    assert set(images.PIP_SETTINGS.values()) <= declared


def test_a_failing_build_step_names_itself_and_its_log(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(ClusterError) as raised:
        images._step("building the probe image", ["sh", "-c", "echo no space left >&2; exit 3"], "build-probe")
    log_file = tmp_path / "finetune-operator" / "images" / "logs" / "build-probe.log"
    assert str(raised.value) == f"building the probe image failed (exit 3); see {log_file}"
    assert "no space left" in log_file.read_text()


# The images as built here (debootstrap base + buildah), inspected file by file: what each role ships.
SITE = "opt/finetune/lib/python3.11/site-packages"
SHIPS = {
    "operator": {"kopf", "kubernetes", "pydantic_settings", "prometheus_client", "finetune_operator", "yaml"},
    "trainer": {"torch", "transformers", "peft", "tokenizers", "safetensors", "finetune_trainer", "prometheus_client"},
}
NEVER = {
    "operator": {"torch", "transformers", "peft", "finetune_dev", "pip", "setuptools"},
    "trainer": {"kopf", "kubernetes", "cryptography", "pydantic_settings", "finetune_dev", "pip"},
}


@pytest.fixture(scope="module")
def built() -> dict[str, Path]:
    try:
        images.require_tools()
    except ClusterError as error:
        if os.environ.get("FINETUNE_REQUIRE_CLUSTER"):
            raise
        pytest.skip(f"cannot build the images here: {error}")
    return images.build_images()


# A cold build (debootstrap and both images) takes about 6 minutes on 2 busy cores; later runs find it cached.
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("role", ["operator", "trainer"])
def test_built_image_ships_its_role_only(built, role):
    files = images.image_files(built[role])
    packages = {p.split("/")[len(SITE.split("/"))] for p in files if p.startswith(f"{SITE}/") and p != SITE}
    assert SHIPS[role] <= packages, f"{role} image lacks {SHIPS[role] - packages}"
    assert not NEVER[role] & packages, f"{role} image carries {NEVER[role] & packages}"
    assert "opt/finetune/bin/finetune" in files
    assert not [p for p in files if p.startswith(("root/.cache/pip", "src/", "usr/bin/gcc"))]
    assert not {"opt/wheels", "tmp/wheels"} & files, "the build's bind mounts stay out of the image"
    # The only wheels are the base's own (Debian's ensurepip wheels, which python3-venv needs).
    assert not [p for p in files if p.endswith(".whl") and not p.startswith("usr/share/python-wheels/")]
    with tarfile.open(built[role]) as archive:
        manifest = json.load(archive.extractfile("manifest.json"))
        config = json.load(archive.extractfile(manifest[0]["Config"]))["config"]
    assert manifest[0]["RepoTags"] == [images.image_refs()[role]]
    user = "65532:65532" if role == "operator" else last(TRAINER, "USER")
    assert config["User"] == user
