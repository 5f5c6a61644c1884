"""On the real node (issue 22): a model file the workers' uid cannot read fails the job at once, naming the
file, the uid and "permission denied"; and the platform's pod defaults reach the real worker pods, under the
job's own template, with the GPU taint's toleration on GPU workers."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from finetune_dev.cluster.node import Node
from finetune_dev.harness import Jobs, kubectl, wait_for
from finetune_operator.builders import WORKER_UID
from tests.e2e.conftest import POD_DEFAULTS
from tests.e2e.tiny_jobs import JOB, cluster_spec, manifest

pytestmark = pytest.mark.e2e

FAIL_SECONDS = 90  # a job that fails without training
MODEL_FILE = "model.safetensors"


@pytest.fixture
def root_only_model(tiny_assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny assets whose model weights are root's and mode 0600, as seen on a claim written by
    another uid (the package's own assets stay readable for the other tests)."""
    assets = tmp_path_factory.mktemp("root-only-model")
    shutil.copytree(tiny_assets, assets, dirs_exist_ok=True)
    for path in [assets, *assets.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    weights = assets / "model" / MODEL_FILE
    assert weights.is_file(), sorted(p.name for p in (assets / "model").iterdir())
    weights.chmod(0o600)
    assets.parent.chmod(0o755)  # pytest's base folder is root's alone; the kubelet mounts `assets` itself
    return assets


def test_a_model_file_the_workers_cannot_read_fails_the_job_at_once(
    jobs: Jobs, runs: Path, operator: Any, node: Node, root_only_model: Path
) -> None:
    jobs.create(manifest(cluster_spec(root_only_model)))

    status = jobs.wait_phase(JOB, "Failed", timeout=FAIL_SECONDS)

    assert status["restarts"] == 0, "a permanent error spends no restart"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    message = failed["message"]
    assert f"permission denied for uid {WORKER_UID}" in message, message
    assert f"/assets/model/{MODEL_FILE} (owner uid 0, gid 0, mode 0600)" in message, message
    assert "No such file" not in message
    assert f"permission denied for uid {WORKER_UID}" in kubectl("describe", "ftj", JOB, "-n", jobs.namespace).stdout


def test_platform_defaults_and_the_gpu_toleration_reach_the_real_pods_under_the_jobs_template(
    jobs: Jobs, runs: Path, operator: Any, node: Node, tiny_assets: Path
) -> None:
    own = {"template": {"labels": {"platform.finetune.dev/tier": "mine"}}, "gpusPerWorker": 1}
    jobs.create(manifest(cluster_spec(tiny_assets, **own)))

    def scheduled() -> list[Any] | None:
        pods = [p for p in jobs.pods(JOB) if not p.metadata.deletion_timestamp]
        return pods if len(pods) == 2 and all(p.spec.node_name for p in pods) else None

    pods = wait_for(scheduled, 60, what="both GPU workers bound to the node")
    for pod in pods:
        tolerations = [{k: v for k, v in t.to_dict().items() if v is not None} for t in pod.spec.tolerations]
        assert POD_DEFAULTS["tolerations"][0] in tolerations
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
        assert pod.spec.node_selector == POD_DEFAULTS["nodeSelector"]
        assert pod.metadata.labels["platform.finetune.dev/tier"] == "mine", "the job's own label wins"
        assert pod.metadata.annotations["platform.finetune.dev/owner"] == "e2e"
    jobs.delete(JOB)
