"""Integration fixtures: the CRD installed on the session's control plane, and one operator process."""

import pytest

from finetune_dev.harness import Jobs, OperatorProcess, install_crd


@pytest.fixture(scope="session")
def crd(kube):
    install_crd(kube.api_client())


@pytest.fixture(scope="package")  # stopped before other packages run, so it never masks their operator
def operator(kube, crd, tmp_path_factory):
    process = OperatorProcess(kube.kubeconfig, tmp_path_factory.mktemp("operator") / "operator.log")
    process.start()
    yield process
    process.stop()


@pytest.fixture
def jobs(kube, namespace, crd):
    return Jobs(kube.api_client(), namespace)
