"""The e2e fixtures: the embedded cluster's real node (kubelet and containerd, node.py) for the whole
e2e package, the busybox test image, the CRD, the real operator as a process, the tiny model and data,
and a claim for each job's output.

The node goes away with the package, Node object included, so that the integration tests that run after
(same session cluster) find no node and their pods stay Pending.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import kubernetes
import pytest
from kubernetes.client.rest import ApiException

from finetune_dev.cluster.disk import check_free_space
from finetune_dev.cluster.errors import ClusterError
from finetune_dev.cluster.node import Node
from finetune_dev.cluster.provisioner import claim_folder
from finetune_dev.harness import Jobs, OperatorProcess, install_crd
from tests.conftest import EXISTING_CLUSTER_ENV, REQUIRE_CLUSTER_ENV
from tests.e2e.busybox import ensure_busybox_image
from tests.e2e.tiny_jobs import GRACE_SECONDS, make_assets

# Platform defaults as a chart would set them (trainer.podDefaults): every e2e worker carries them, and
# tests/e2e/test_storage_permissions.py checks them on the real pods. Harmless to the other tests.
POD_DEFAULTS = {
    "labels": {"platform.finetune.dev/tier": "e2e"},
    "annotations": {"platform.finetune.dev/owner": "e2e"},
    "tolerations": [{"key": "platform.finetune.dev/dedicated", "operator": "Exists", "effect": "NoSchedule"}],
    "nodeSelector": {"kubernetes.io/os": "linux"},
}


@pytest.fixture(scope="package")
def node(kube) -> Iterator[Node]:
    if kube.control_plane is None:
        pytest.skip(f"the real node runs beside the embedded control plane only (${EXISTING_CLUSTER_ENV} is set)")
    node = kube.control_plane.node()
    check_free_space(node.folder)  # a short disk fails here in one line, not as timeouts later
    try:
        node.start()
    except ClusterError as error:
        if os.environ.get(REQUIRE_CLUSTER_ENV):
            raise
        pytest.skip(f"no embedded node here: {error}")
    try:
        yield node
    finally:
        node.remove()
        try:
            kubernetes.client.CoreV1Api(kube.api_client()).delete_node(node.name)
        except ApiException as error:
            if error.status != 404:
                raise


@pytest.fixture(scope="package")
def busybox(node: Node, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The busybox test image, in the node's containerd; its reference."""
    return ensure_busybox_image(node.containerd_address, tmp_path_factory.mktemp("busybox"))


@pytest.fixture(scope="package")
def crd(kube) -> None:
    install_crd(kube.api_client())


@pytest.fixture(scope="package")
def trainer_image(node: Node) -> str:
    """The trainer image, built from trainer/Dockerfile (cached) and imported into the node's containerd."""
    try:
        from finetune_dev.images import ensure_images
    except ImportError:
        if os.environ.get(REQUIRE_CLUSTER_ENV):
            raise
        pytest.skip("the trainer image needs finetune_dev.images.ensure_images")
    return ensure_images(str(node.containerd_address))["trainer"]


@pytest.fixture(scope="package")
def operator(kube, crd, node, trainer_image, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    """`finetune operator` as a real process with the admin kubeconfig, its workers running the trainer
    image on the node; tests may kill and restart it."""
    env = {
        "FINETUNE_OPERATOR_TERMINATION_GRACE_PERIOD_SECONDS": str(GRACE_SECONDS),
        "FINETUNE_OPERATOR_TRAINER_IMAGE": trainer_image,
        "FINETUNE_OPERATOR_IMAGE_PULL_POLICY": "Never",
        "FINETUNE_OPERATOR_POD_DEFAULTS": json.dumps(POD_DEFAULTS),
    }
    process = OperatorProcess(kube.kubeconfig, tmp_path_factory.mktemp("operator") / "operator.log", env)
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="package")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model (model/) and data set (train.jsonl), made offline once for the package; readable by
    the workers' non-root user, which sees them through a hostPath volume."""
    assets = make_assets(tmp_path_factory.mktemp("tiny-assets"))
    for path in [assets, *assets.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return assets


@pytest.fixture
def jobs(kube, namespace: str, crd) -> Jobs:
    return Jobs(kube.api_client(), namespace)


def create_runs_claim(kube, namespace: str, node: Node) -> Path:
    """The claim `runs` in namespace (the node provisions it); returns its folder on this machine."""
    claim = {
        "metadata": {"name": "runs"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    kubernetes.client.CoreV1Api(kube.api_client()).create_namespaced_persistent_volume_claim(namespace, claim)
    return claim_folder(node.folder, namespace, "runs")


@pytest.fixture
def runs(kube, namespace: str, node: Node) -> Path:
    """The claim `runs` of the test's namespace, where jobs keep their output; its folder on this machine."""
    return create_runs_claim(kube, namespace, node)
