"""Shared factories for unit tests: FineTuneJob bodies and pods as the API server would return them."""

from __future__ import annotations

from typing import Any

import pytest

from finetune_operator.api import FineTuneJob
from finetune_operator.builders import LABEL_ATTEMPT, LABEL_JOB, LABEL_RANK, TRAINER_CONTAINER
from finetune_operator.config import OperatorSettings


def job_body(name: str = "llama", namespace: str = "ml", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": "uid-1",
            "generation": 1,
            "resourceVersion": "1",
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": {"model": "org/base", "dataset": {"path": "/data/train.jsonl"}, "workers": 2, **spec},
    }


@pytest.fixture
def make_job():
    def make(status: dict[str, Any] | None = None, **spec: Any) -> FineTuneJob:
        body = job_body(**spec)
        if status:
            body["status"] = status
        return FineTuneJob.model_validate(body)

    return make


@pytest.fixture
def settings() -> OperatorSettings:
    return OperatorSettings(trainer_image="registry.example/trainer:1")


def pod(
    rank: int,
    attempt: int = 0,
    phase: str = "Pending",
    ready: bool = False,
    exit_code: int | None = None,
    reason: str | None = None,
    message: str | None = None,
    deleting: bool = False,
    job: str = "llama",
    finished_at: str = "2026-01-01T00:10:00Z",
    pod_reason: str | None = None,
    owner_uid: str = "uid-1",
    node: str | None = "gpu-node-1",
    deleted_at: str = "2026-01-01T00:05:00Z",
    finalizers: list[str] | None = None,
    unschedulable: str | None = None,
    scheduled_at: str = "2026-01-01T00:09:00Z",
) -> dict[str, Any]:
    """A worker pod as the API server shows it."""
    state: dict[str, Any] = {"running": {}} if phase == "Running" else {"waiting": {"reason": "ContainerCreating"}}
    if exit_code is not None:
        state = {
            "terminated": {
                "exitCode": exit_code,
                "reason": reason or ("Completed" if exit_code == 0 else "Error"),
                "message": message,
                "finishedAt": finished_at,
            }
        }
    body = {
        "metadata": {
            "name": f"{job}-worker-{rank}",
            "uid": f"{owner_uid}-{job}-{rank}-{attempt}",
            "labels": {LABEL_JOB: job, LABEL_RANK: str(rank), LABEL_ATTEMPT: str(attempt)},
            "ownerReferences": [{"kind": "FineTuneJob", "name": job, "uid": owner_uid, "controller": True}],
            "creationTimestamp": scheduled_at,
        },
        "spec": {"nodeName": node} if node else {},
        "status": {
            "phase": phase,
            "conditions": [
                {"type": "Ready", "status": "True" if ready else "False"},
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": scheduled_at}
                if node
                else {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": unschedulable},
            ],
            "containerStatuses": [{"name": TRAINER_CONTAINER, "state": state}],
        },
    }
    if pod_reason:
        body["status"]["reason"] = pod_reason
        body["status"]["message"] = message
    if deleting:
        body["metadata"]["deletionTimestamp"] = deleted_at
        body["metadata"]["deletionGracePeriodSeconds"] = 60
    if finalizers:
        body["metadata"]["finalizers"] = finalizers
    return body
