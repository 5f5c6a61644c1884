"""Rank 0's progress path: the trainer's token may patch its job's progress ConfigMap and nothing else."""

import json
from pathlib import Path

import kubernetes
import pytest
from kubernetes.client import ApiException

from finetune_dev.harness import GROUP, PLURAL, VERSION, job_manifest, wait_for
from finetune_trainer.contract import ProgressReport
from finetune_trainer.progress_configmap import ConfigMapProgressReporter

pytestmark = pytest.mark.integration


def trainer_client(kube, namespace, account, tmp_path: Path):
    """An API client and a token file authenticated as the job's trainer ServiceAccount."""
    core = kubernetes.client.CoreV1Api(kube.api_client())
    wait_for(
        lambda: _exists(lambda: core.read_namespaced_service_account(account, namespace)),
        30,
        what=f"ServiceAccount {account}",
    )
    request = {"spec": {"audiences": [], "expirationSeconds": 3600}}
    token = core.create_namespaced_service_account_token(account, namespace, request).status.token
    admin = kube.api_client().configuration
    configuration = kubernetes.client.Configuration()
    configuration.host, configuration.ssl_ca_cert = admin.host, admin.ssl_ca_cert
    configuration.api_key = {"authorization": f"Bearer {token}"}
    token_file = tmp_path / "token"
    token_file.write_text(token)
    return kubernetes.client.ApiClient(configuration), token_file, admin


def _exists(read):
    try:
        return read()
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def test_progress_reaches_status_and_the_token_can_do_nothing_else(kube, jobs, operator, tmp_path):
    jobs.create(job_manifest("reporter", workers=1))
    jobs.wait_pods("reporter", 1)
    client, token_file, admin = trainer_client(kube, jobs.namespace, "reporter-trainer", tmp_path)
    wait_for(
        lambda: _exists(lambda: jobs.core.read_namespaced_config_map("reporter-progress", jobs.namespace)),
        30,
        what="the progress ConfigMap",
    )

    reporter = ConfigMapProgressReporter(
        admin.host, jobs.namespace, "reporter-progress", token_file, Path(admin.ssl_ca_cert)
    )
    reporter(
        ProgressReport.model_validate(
            {
                "step": 7,
                "totalSteps": 20,
                "loss": 1.25,
                "tokensPerSecond": 812.5,
                "lastCheckpointStep": 5,
                "lastCheckpointTime": "2026-01-01T00:00:00Z",
            }
        )
    )
    status = wait_for(
        lambda: (s := jobs.status("reporter")).get("progress", {}).get("step") == 7 and s,
        30,
        what="status.progress to follow the report",
    )
    assert status["progress"]["totalSteps"] == 20 and status["progress"]["loss"] == 1.25
    assert status["lastCheckpoint"]["step"] == 5

    core = kubernetes.client.CoreV1Api(client)
    custom = kubernetes.client.CustomObjectsApi(client)
    forbidden = [
        lambda: core.patch_namespaced_config_map("reporter-config", jobs.namespace, {"data": {"config.yaml": "x"}}),
        lambda: core.list_namespaced_secret(jobs.namespace),
        lambda: core.create_namespaced_config_map(jobs.namespace, {"metadata": {"name": "other-progress"}}),
        lambda: custom.patch_namespaced_custom_object(
            GROUP, VERSION, jobs.namespace, PLURAL, "reporter", {"spec": {"workers": 9}}
        ),
        lambda: custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, jobs.namespace, PLURAL, "reporter", {"status": {"phase": "Succeeded"}}
        ),
        lambda: core.delete_namespaced_pod("reporter-worker-0", jobs.namespace),
    ]
    for attempt in forbidden:
        with pytest.raises(ApiException) as refused:
            attempt()
        assert refused.value.status == 403


def test_invalid_progress_is_ignored(kube, jobs, operator):
    jobs.create(job_manifest("garbled", workers=1))
    jobs.wait_pods("garbled", 1)
    wait_for(
        lambda: _exists(lambda: jobs.core.read_namespaced_config_map("garbled-progress", jobs.namespace)),
        30,
        what="the progress ConfigMap",
    )
    jobs.core.patch_namespaced_config_map("garbled-progress", jobs.namespace, {"data": {"progress.json": "{not json"}})
    good = json.dumps({"step": 3, "totalSteps": 9})
    jobs.core.patch_namespaced_config_map("garbled-progress", jobs.namespace, {"data": {"progress.json": good}})
    wait_for(lambda: jobs.status("garbled").get("progress", {}).get("step") == 3, 30, what="the valid report")
