"""The README's Argo CD health check (Lua), run as Argo CD runs it, on the statuses the operator writes."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator.api import FineTuneJob, Phase
from finetune_operator.status import reconcile

from .conftest import job_body, pod

lupa = pytest.importorskip("lupa", reason="the dev extra's Lua interpreter (make setup)")

README = Path(__file__).resolve().parents[2] / "README.md"
HEALTH_KEY = "resource.customizations.health.finetune.dev_FineTuneJob"
NOW = datetime(2026, 1, 1, 0, 10, tzinfo=timezone.utc)


def health_check_script() -> str:
    """The Lua that the README tells users to put in argocd-cm."""
    for block in re.findall(r"```yaml\n(.*?)```", README.read_text(), re.S):
        if HEALTH_KEY in block:
            return yaml.safe_load(block)["data"][HEALTH_KEY]
    raise AssertionError(f"README.md has no ```yaml block with {HEALTH_KEY}")


def argocd_health(obj: dict[str, Any]) -> tuple[str, str]:
    """(status, message) of the script for `obj`, which it sees as the global `obj`, as in Argo CD."""
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute(health_check_script())
    return result["status"], result["message"]


def written(job: FineTuneJob, pods: list[dict[str, Any]]) -> dict[str, Any]:
    """The job as the API server returns it after the operator's status patch."""
    status = reconcile(job, pods, NOW).status.model_dump(by_alias=True, exclude_none=True, mode="json")
    return {**job.model_dump(by_alias=True, exclude_none=True, mode="json"), "status": status}


def job(status: dict[str, Any] | None = None, **spec: Any) -> FineTuneJob:
    body = job_body(**spec)
    if status:
        body["status"] = status
    return FineTuneJob.model_validate(body)


def running() -> dict[str, Any]:
    return written(job(), [pod(0, phase="Running", ready=True), pod(1, phase="Running", ready=True)])["status"]


# What each phase should read as in Argo CD: a batch job is Progressing until it ends, as Argo CD's own
# checks for Jobs and Kubeflow's PyTorchJob have it. A new phase must be placed here.
HEALTH = {
    "Pending": "Progressing",
    "Queued": "Progressing",  # waiting for a queue (Kueue) to admit the gang
    "Running": "Progressing",
    "Restarting": "Progressing",
    "Succeeded": "Healthy",
    "Failed": "Degraded",
    "Suspended": "Suspended",
}


def test_every_phase_maps_to_an_argocd_health():
    assert {phase.value for phase in Phase} <= set(HEALTH), "a phase the health check was not decided for"
    ran = running()
    dataset_missing = pod(0, phase="Failed", exit_code=2, message="dataset.path /d.jsonl does not exist")
    written_by_the_operator = {
        "Pending": written(job(), []),
        "Running": written(job(ran), [pod(r, phase="Running", ready=True) for r in (0, 1)]),
        "Restarting": written(job(ran), [pod(0, phase="Failed", exit_code=1), pod(1, phase="Running")]),
        "Succeeded": written(job(ran), [pod(r, phase="Succeeded", exit_code=0) for r in (0, 1)]),
        "Failed": written(job(ran), [dataset_missing]),
        "Suspended": written(job(ran, suspend=True), [pod(r, phase="Running") for r in (0, 1)]),
    }
    for phase, obj in written_by_the_operator.items():
        assert obj["status"]["phase"] == phase, (phase, obj["status"])
        status, message = argocd_health(obj)
        assert (status, message.split(" ")[0].rstrip(":")) == (HEALTH[phase], phase), (phase, message)
    for phase in {phase.value for phase in Phase} - set(written_by_the_operator):
        assert argocd_health({**job_body(), "status": {"phase": phase}}) == (HEALTH[phase], phase)


def test_the_message_says_why_a_job_failed():
    ran = running()
    failed = written(job(ran), [pod(0, phase="Failed", exit_code=2, message="dataset.path /d.jsonl does not exist")])
    status, message = argocd_health(failed)
    assert status == "Degraded" and "/d.jsonl does not exist" in message


def test_a_job_the_operator_has_not_seen_is_progressing():
    assert argocd_health(job_body()) == ("Progressing", "Waiting for the operator")


def test_an_edit_not_yet_acted_on_is_progressing_not_the_old_verdict():
    done = written(job(running()), [pod(r, phase="Succeeded", exit_code=0) for r in (0, 1)])
    assert argocd_health(done)[0] == "Healthy"
    edited = {**done, "metadata": {**done["metadata"], "generation": 2}, "status": {**done["status"]}}
    edited["status"]["observedGeneration"] = 1
    assert argocd_health(edited) == ("Progressing", "Waiting for the operator to act on generation 2")
