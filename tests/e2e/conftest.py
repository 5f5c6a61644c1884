"""The e2e fixtures: the local node (one node agent process for the whole e2e package), the CRD, the real
operator as a process, the tiny model and data, and a claim for each job's output.

The node goes away with the package, Node object included, so that the integration tests that run after
(same session cluster) find no node and their pods stay Pending. Pods on the local node share the host's
ports, so only one DDP gang may run at a time (MASTER_PORT 29500): every test that uses the node waits,
after its namespace is deleted, until no container of the node runs any more.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import kubernetes
import pytest
from kubernetes.client.rest import ApiException

from finetune_dev.cluster import processes
from finetune_dev.cluster.localnode import LocalNode
from finetune_dev.cluster.volumes import claim_folder
from tests.e2e.tiny_jobs import GRACE_SECONDS, make_assets
from tests.support import Jobs, OperatorProcess, install_crd, wait_for

QUIET_TIMEOUT_SECONDS = 90.0


@pytest.fixture(scope="package")
def local_node(kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNode]:
    node = LocalNode(tmp_path_factory.mktemp("node"), kube.kubeconfig)
    node.start()
    try:
        yield node
    finally:
        node.stop()
        try:
            kubernetes.client.CoreV1Api(kube.api_client()).delete_node(node.name)
        except ApiException as error:
            if error.status != 404:
                raise


def running_containers(node: LocalNode) -> list[Path]:
    """The pid files of the node's containers whose process still runs."""
    return [pid_file for pid_file in (node.folder / "pods").glob("*/*.pid") if processes.running_pid(pid_file)]


@pytest.fixture(autouse=True)
def one_gang_at_a_time(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a test on the node (and after its namespace is gone: this fixture is set up first, so torn
    down last), wait until none of its pods runs, so that the next gang finds MASTER_PORT free."""
    node = request.getfixturevalue("local_node") if "local_node" in request.fixturenames else None
    yield
    if node is not None:
        wait_for(
            lambda: not running_containers(node), QUIET_TIMEOUT_SECONDS, interval=0.5, what="the node's pods to stop"
        )


@pytest.fixture(scope="package")
def crd(kube) -> None:
    install_crd(kube.api_client())


@pytest.fixture(scope="package")
def operator(kube, crd, local_node, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    """`finetune operator` as a real process with the admin kubeconfig; tests may kill and restart it."""
    env = {"FINETUNE_OPERATOR_TERMINATION_GRACE_PERIOD_SECONDS": str(GRACE_SECONDS)}
    process = OperatorProcess(kube.kubeconfig, tmp_path_factory.mktemp("operator") / "operator.log", env)
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="package")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model (model/) and data set (train.jsonl), made offline once for the package."""
    return make_assets(tmp_path_factory.mktemp("tiny-assets"))


@pytest.fixture
def jobs(kube, namespace: str, crd) -> Jobs:
    return Jobs(kube.api_client(), namespace)


def create_runs_claim(kube, namespace: str, node: LocalNode) -> Path:
    """The claim `runs` in namespace (the node provisions it); returns its folder on this machine."""
    claim = {
        "metadata": {"name": "runs"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    kubernetes.client.CoreV1Api(kube.api_client()).create_namespaced_persistent_volume_claim(namespace, claim)
    return claim_folder(node.folder, namespace, "runs")


@pytest.fixture
def runs(kube, namespace: str, local_node: LocalNode) -> Path:
    """The claim `runs` of the test's namespace, where jobs keep their output; its folder on this machine."""
    return create_runs_claim(kube, namespace, local_node)
