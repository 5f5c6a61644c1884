"""Both sides keep to finetune_trainer.contract: env names, exit codes, files and the progress report."""

from __future__ import annotations

import ast
import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from finetune_operator import api
from finetune_operator.builders import build_worker_pod, torchrun_env
from finetune_operator.config import OperatorSettings
from finetune_operator.status import apply_progress
from finetune_trainer import contract
from finetune_trainer.contract import RESERVED_ENV, WIRING_ENV, ExitCode, ProgressReport, exit_code_of
from finetune_trainer.distributed import pod_exit_code

REPO = Path(__file__).resolve().parents[2]
SOURCES = [*sorted((REPO / "operator").rglob("*.py")), *sorted((REPO / "trainer").rglob("*.py"))]
# Strings that name a contracted file, env variable or key: only contract.py may spell them.
CONTRACT_LITERALS = {
    contract.PROGRESS_FILE,
    contract.METRICS_FILE,
    contract.TERMINATION_LOG_PATH,
    contract.TERMINATION_LOG_ENV,
    *contract.JOB_ENV,
}


def job(**spec):
    return api.FineTuneJob.model_validate(
        {
            "apiVersion": api.API_VERSION,
            "kind": api.KIND,
            "metadata": {"name": "j", "namespace": "ns", "uid": "u-1"},
            "spec": {"model": "m", "dataset": {"path": "/d.jsonl"}, **spec},
        }
    )


def test_the_operator_injects_exactly_the_reserved_env():
    pod = build_worker_pod(job(workers=2), rank=1, attempt=0, settings=OperatorSettings())
    injected = {var["name"] for var in pod["spec"]["containers"][0]["env"]}
    assert injected | {"RANK"} >= RESERVED_ENV
    assert set(torchrun_env(job(workers=2).spec, 1, "addr")) == set(WIRING_ENV)


@pytest.mark.parametrize("name", sorted(RESERVED_ENV))
def test_user_env_may_not_override_the_wiring(name):
    with pytest.raises(ValueError, match=r"spec\.template\.env"):
        job(template={"env": [{"name": name, "value": "x"}]})


def test_pythonunbuffered_is_protected():
    assert "PYTHONUNBUFFERED" in RESERVED_ENV


@pytest.mark.parametrize(
    ("codes", "stopping", "expected"),
    [
        ([0, 0], False, ExitCode.DONE),
        ([0, 2], False, ExitCode.PERMANENT),
        ([143, 0], True, ExitCode.STOPPED),
        ([0, -9], False, 137),
        ([1, 143], False, ExitCode.RETRYABLE),
    ],
)
def test_a_pod_exits_with_one_contracted_code(codes, stopping, expected):
    assert pod_exit_code(codes, stopping) == expected


def test_signals_are_reported_as_a_container_runtime_does():
    assert exit_code_of(-15) == ExitCode.STOPPED == 143
    assert exit_code_of(-9) == 137 and exit_code_of(2) == ExitCode.PERMANENT


def test_the_report_the_trainer_writes_is_the_one_the_operator_reads():
    report = ProgressReport(step=40, total_steps=100, loss=1.5, tokens_per_second=900.0, eta_seconds=60)
    report = report.model_copy(
        update={"last_checkpoint_step": 30, "last_checkpoint_time": "2026-01-01T00:00:00Z", "activity": "training"}
    )
    wire = json.loads(report.to_json())
    assert {"step", "totalSteps", "tokensPerSecond", "etaSeconds", "lastCheckpointStep", "time", "activity"} <= set(
        wire
    )
    status = api.FineTuneJobStatus()
    apply_progress(status, ProgressReport.from_json(report.to_json()), datetime(2026, 1, 1, tzinfo=timezone.utc))
    assert status.progress is not None and status.last_checkpoint is not None
    assert (status.progress.step, status.progress.eta_seconds, status.progress.updated) == (40, 60, report.time)
    assert (status.progress.activity, status.progress.advanced) == ("training", "2026-01-01T00:00:00Z")
    assert status.last_checkpoint.step == 30


@pytest.mark.parametrize("raw", [None, "", "{not json", "[]", '{"step": -1}'])
def test_an_unreadable_report_is_ignored(raw):
    assert ProgressReport.from_json(raw) is None


def test_no_module_but_the_contract_spells_its_names():
    offenders = []
    for path in SOURCES:
        if path.name == "contract.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in CONTRACT_LITERALS:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}")
    assert not offenders, "use finetune_trainer.contract instead of spelling these:\n" + "\n".join(offenders)
