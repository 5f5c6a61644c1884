"""Fixtures of the chart tests. Cluster tests use `kube` and `namespace` from tests/conftest.py.

Tests elsewhere (e2e, `make demo`) import the helpers themselves from tests.helm.chart:
`install_chart(kubeconfig, namespace, values)` and `chart_operator_kubeconfig(kube, release_namespace)`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from kubernetes.client import ApiException

from tests.helm.chart import (
    RELEASE,
    adopt_cluster_objects,
    chart_operator_kubeconfig,
    install_chart,
    token_api_client,
    uninstall_chart,
)

# Cluster-scoped objects a release may own. Other tests on the same cluster create the FineTuneJob CRD
# with kubectl-like calls, so a release adopts whatever exists; crds.keep (the default) keeps them after.
CHART_CRDS = ["finetunejobs.finetune.dev"]


class Release:
    """One installed release of the chart, uninstalled by the fixture."""

    def __init__(self, kube: Any, namespace: str, name: str = RELEASE) -> None:
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.summary: dict[str, Any] = {}

    def install(self, values: dict[str, Any] | None = None) -> dict[str, Any]:
        """Install, or upgrade to `values` (not merged with earlier ones: Helm's --reset-values)."""
        adopt_cluster_objects(self.kube.api_client(), CHART_CRDS, self.namespace, release=self.name)
        self.summary = install_chart(str(self.kube.kubeconfig), self.namespace, values, release=self.name)
        return self.summary

    def operator_kubeconfig(self, tmp_path: Path) -> Path:
        return chart_operator_kubeconfig(
            self.kube, self.namespace, release=self.name, path=tmp_path / f"{self.name}-operator.kubeconfig"
        )

    def operator_client(self, tmp_path: Path) -> kubernetes.client.ApiClient:
        """A client authenticated as the chart's operator ServiceAccount, with a TokenRequest token."""
        return token_api_client(self.operator_kubeconfig(tmp_path))

    def uninstall(self) -> None:
        uninstall_chart(str(self.kube.kubeconfig), self.namespace, release=self.name)


@pytest.fixture
def release(kube: Any, namespace: str) -> Iterator[Release]:
    """The chart, to be installed by the test into its fresh namespace; uninstalled afterwards.

    Always the same release name: the CRDs outlive each release (crds.keep) and the next one takes them
    over, which Helm's server-side apply allows only while their labels (which name the release) agree.
    """
    installed = Release(kube, namespace)
    yield installed
    installed.uninstall()


@pytest.fixture
def extra_namespaces(kube: Any) -> Iterator[list[str]]:
    """Two more fresh namespaces (for watchNamespaces), deleted afterwards."""
    core = kubernetes.client.CoreV1Api(kube.api_client())
    names = [f"watched-{uuid.uuid4().hex[:6]}" for _ in range(2)]
    for name in names:
        core.create_namespace({"metadata": {"name": name}})
    yield names
    for name in names:
        try:
            core.delete_namespace(name)
        except ApiException as e:
            if e.status != 404:
                raise
