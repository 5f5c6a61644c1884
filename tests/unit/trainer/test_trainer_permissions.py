"""Files the workers' uid cannot read or write are named as such (issue 22): "permission denied for uid U",
the path and its owner, instead of the "No such file or directory" the libraries report.

Run for real: the checks run in a forked child that drops to the workers' uid 65532 (root reads anything),
so the tests need root, as the project's machines and CI have."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from finetune_trainer import data, files, model

WORKER_UID = 65532
UID = WORKER_UID
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become the workers' uid")


def _check(what: str, path: Path) -> str:
    if what == "model":
        return str(model.unreadable_model_path(str(path)))
    if what == "data":
        try:
            next(data.read_records(path, "text"))
            return "read"
        except data.DataError as e:
            return str(e)
    try:
        files.check_writable(path)
        return "written"
    except OSError as e:
        return str(e.strerror)


def as_worker(what: str, path: Path) -> str:
    """What the trainer's check says about `path`, run as the workers' uid: a forked child drops to it
    (the interpreter itself may live where that uid cannot go, so nothing is exec'd)."""
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(reader)
            os.setgroups([])
            os.setgid(WORKER_UID)
            os.setuid(WORKER_UID)
            os.write(writer, _check(what, path).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(writer)
    with os.fdopen(reader) as pipe:
        said = pipe.read()
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0, said
    return said


@pytest.fixture
def folder() -> Iterator[Path]:
    """A folder the worker uid may enter (pytest's own tmp_path is 0700 to root)."""
    path = Path(tempfile.mkdtemp(prefix="permissions-"))
    path.chmod(0o755)
    yield path
    for inner in [path, *path.rglob("*")]:
        inner.chmod(0o755 if inner.is_dir() else 0o644)
    subprocess.run(["rm", "-rf", str(path)], check=True)


def test_a_model_file_the_worker_cannot_read_is_named_with_its_owner(folder):
    model = folder / "model"
    model.mkdir(mode=0o755)
    (model / "config.json").write_text("{}")
    (model / "config.json").chmod(0o644)
    weights = model / "model.safetensors"
    weights.write_bytes(b"0" * 16)
    weights.chmod(0o600)
    said = as_worker("model", model)
    assert said.startswith("spec.model: ")
    assert f"permission denied for uid {UID}" in said
    assert f"{weights} (owner uid {os.geteuid()}, gid {os.getegid()}, mode 0600)" in said
    assert "No such file" not in said


def test_a_readable_model_is_not_refused(folder):
    model = folder / "model"
    model.mkdir(mode=0o755)
    (model / "config.json").write_text("{}")
    (model / "config.json").chmod(0o644)
    assert as_worker("model", model) == "None"


def test_a_data_set_behind_a_closed_folder_is_not_reported_missing(folder):
    closed = folder / "private"
    closed.mkdir(mode=0o700)
    (closed / "train.jsonl").write_text('{"text": "hello"}\n')
    said = as_worker("data", closed / "train.jsonl")
    assert said.startswith("dataset.path: ")
    assert f"permission denied for uid {UID}" in said and f"{closed} (owner uid {os.geteuid()}" in said
    assert "no such file" not in said


def test_a_readable_data_set_is_read(folder):
    (folder / "train.jsonl").write_text('{"text": "hello"}\n')
    (folder / "train.jsonl").chmod(0o644)
    assert as_worker("data", folder / "train.jsonl") == "read"


def test_an_output_claim_the_worker_cannot_write_names_the_folder_and_owner(folder):
    claim = folder / "claim"
    claim.mkdir(mode=0o755)
    said = as_worker("output", claim / "my-job")
    assert f"permission denied for uid {UID}" in said
    assert f"{claim} (owner uid {os.geteuid()}, gid {os.getegid()}, mode 0755)" in said
