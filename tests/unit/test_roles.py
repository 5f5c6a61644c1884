"""Dependencies by role: the lock pins every role's direct dependencies, and each role's package imports
without the other roles' dependencies (the images' actual contents are checked in tests/helm/test_dockerfiles.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.helm.chart import REPO

LOCK = REPO / "constraints.txt"
TORCH_STACK = ("torch", "transformers", "peft", "tokenizers", "safetensors", "accelerate")
CLIENT_STACK = ("kopf", "kubernetes", "cryptography", "pydantic_settings")


def lock() -> dict[str, str]:
    pins: dict[str, str] = {}
    for number, line in enumerate(LOCK.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        name, separator, version = line.partition("==")
        assert separator and Version(version), f"{LOCK.name}:{number}: not name==version: {line!r}"
        key = canonicalize_name(name)
        assert key not in pins, f"{LOCK.name}:{number}: {name} pinned twice"
        pins[key] = version
    return pins


def role_requirements() -> dict[str, list[Requirement]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    dev_project = tomllib.loads((REPO / "dev" / "pyproject.toml").read_text())["project"]
    roles = {"base": project["dependencies"], **project["optional-dependencies"]}
    roles["dev distribution"] = dev_project["dependencies"]
    return {role: [Requirement(r) for r in reqs] for role, reqs in roles.items()}


def test_roles_are_the_documented_ones():
    assert set(role_requirements()) == {"base", "operator", "trainer", "dev", "dev distribution"}
    names = {role: {canonicalize_name(r.name) for r in reqs} for role, reqs in role_requirements().items()}
    assert names["base"] == {"pydantic", "pyyaml"}
    assert {"kopf", "kubernetes"} <= names["operator"] and not names["operator"] & {"torch", "transformers"}
    assert {"torch", "transformers", "peft"} <= names["trainer"]
    assert not names["trainer"] & {"kopf", "kubernetes", "cryptography", "pydantic-settings"}


def test_lock_pins_every_direct_dependency_within_its_range():
    pins = lock()
    assert pins["torch"] == "2.13.0", "the torch every test runs on; the images install this version's build"
    for role, requirements in role_requirements().items():
        for requirement in requirements:
            name = canonicalize_name(requirement.name)
            if name.startswith("finetune-"):
                continue  # the project's own distributions
            assert name in pins, f"{role} needs {requirement}, which {LOCK.name} does not pin"
            assert requirement.specifier.contains(pins[name], prereleases=True), (
                f"{LOCK.name} pins {name}=={pins[name]}, outside {role}'s {requirement}"
            )


def test_this_environment_runs_the_locked_versions():
    """`make setup` installs with the lock as constraints, so the tests run on what the images ship."""
    strays = {}
    for name, version in lock().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if Version(installed).public != Version(version).public:
            strays[name] = f"{installed} installed, {version} locked"
    assert not strays, f"run `make setup` again: {strays}"


IMPORT_ALL = """
import importlib, importlib.abc, pkgutil, sys
blocked = set(sys.argv[1].split(","))

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r} (not in this role)", name=name)

sys.meta_path.insert(0, Blocked())
for name in sys.argv[2:]:
    module = importlib.import_module(name)
    for found in pkgutil.walk_packages(getattr(module, "__path__", []), name + "."):
        if not found.name.endswith(".__main__"):
            importlib.import_module(found.name)
print("imported")
"""


def import_without(blocked: tuple[str, ...], *modules: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", IMPORT_ALL, ",".join(blocked), *modules],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        timeout=120,
    )


def test_operator_role_imports_without_torch_or_dev_code():
    done = import_without((*TORCH_STACK, "finetune_dev"), "finetune_operator")
    assert done.returncode == 0 and done.stdout.strip() == "imported", done.stderr


def test_trainer_role_imports_without_kubernetes_clients():
    done = import_without((*CLIENT_STACK, "finetune_dev"), "finetune_trainer")
    assert done.returncode == 0 and done.stdout.strip() == "imported", done.stderr
    # `finetune train`, the trainer image's command, comes through the operator package's CLI.
    cli = import_without((*CLIENT_STACK, "finetune_dev"), "finetune_operator.cli")
    assert cli.returncode == 0, cli.stderr


@pytest.mark.parametrize("blocked", ["torch", "kopf"])
def test_the_import_check_would_catch_a_stray_import(blocked):
    done = import_without((blocked,), "finetune_operator", "finetune_trainer")
    assert done.returncode != 0 and f"No module named '{blocked}" in done.stderr
