"""The local node for the e2e tests: one node agent process for the whole e2e package.

It goes away with the package, Node object included, so that the integration tests that run after
(same session cluster) find no node and their pods stay Pending.
"""

from __future__ import annotations

from collections.abc import Iterator

import kubernetes
import pytest
from kubernetes.client.rest import ApiException

from finetune_operator.cluster.localnode import LocalNode


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
