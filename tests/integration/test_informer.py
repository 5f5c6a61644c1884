"""The operator's pod informer and kube.py's list and watch against the real API server."""

from __future__ import annotations

from typing import Any

import kubernetes
import pytest

from finetune_dev.harness import wait_for
from finetune_operator import kube as operator_kube
from finetune_operator.builders import LABEL_JOB
from finetune_operator.informer import Informer, worker_view


def worker(name: str, job: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {LABEL_JOB: job}},
        "spec": {"containers": [{"name": "trainer", "image": "trainer:1"}]},
    }


@pytest.fixture
def core(kube) -> kubernetes.client.CoreV1Api:
    operator_kube.api_client.cache_clear()  # kube.py's client for this session's cluster
    return kubernetes.client.CoreV1Api(kube.api_client())


def test_the_pod_informer_lists_then_follows_creates_updates_and_deletes(core, namespace):
    core.create_namespaced_pod(namespace, worker("a-worker-0", "a"))
    core.create_namespaced_pod(namespace, {**worker("unlabelled", "a"), "metadata": {"name": "unlabelled"}})
    woken: list[tuple[str, str]] = []
    pods = Informer("Pod", LABEL_JOB, [namespace], worker_view, woken.append)
    pods.start()
    try:

        def indexed() -> list[str]:
            return sorted(p["metadata"]["name"] for p in pods.get((namespace, "a")))

        assert indexed() == ["a-worker-0"]  # listed before start() returns
        assert woken == [(namespace, "a")]
        core.create_namespaced_pod(namespace, worker("a-worker-1", "a"))
        wait_for(lambda: indexed() == ["a-worker-0", "a-worker-1"], 30, what="the created pod indexed")
        core.patch_namespaced_pod("a-worker-1", namespace, {"metadata": {"annotations": {"seen": "yes"}}})
        wait_for(lambda: len(woken) >= 3, 30, what="the update to wake the job")
        core.delete_namespaced_pod("a-worker-0", namespace, grace_period_seconds=0)  # on no node: gone at once
        wait_for(lambda: indexed() == ["a-worker-1"], 30, what="the deleted pod out of the index")
    finally:
        pods.stop()
