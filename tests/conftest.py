"""Cluster fixtures shared by the integration and e2e tests.

`kube`: one embedded control plane for the whole session (no node: pods stay Pending unless a test
package adds the real node, as tests/e2e does), or the cluster named by $FINETUNE_TEST_KUBECONFIG.
`namespace`: a fresh namespace per test. Without the Kubernetes binaries these tests skip, unless
$FINETUNE_REQUIRE_CLUSTER is set (CI), where they fail.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import kubernetes
import pytest
from kubernetes.client.rest import ApiException

from finetune_dev.cluster.build import ensure_binaries
from finetune_dev.cluster.controlplane import ControlPlane
from finetune_dev.cluster.errors import ClusterError

EXISTING_CLUSTER_ENV = "FINETUNE_TEST_KUBECONFIG"
REQUIRE_CLUSTER_ENV = "FINETUNE_REQUIRE_CLUSTER"
NAMESPACE_READY_SECONDS = 30.0


@dataclass(frozen=True)
class Kube:
    """The test session's cluster."""

    kubeconfig: str
    control_plane: ControlPlane | None  # None when the session uses an existing cluster
    # Before 1.24 a ServiceAccount can run pods only once the token controller gave it a Secret.
    waits_for_token_secrets: bool

    def api_client(self) -> kubernetes.client.ApiClient:
        return kubernetes.config.new_client_from_config(config_file=self.kubeconfig)

    @property
    def env(self) -> dict[str, str]:
        """The environment for a subprocess that should talk to this cluster."""
        return {**os.environ, "KUBECONFIG": self.kubeconfig}


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    previous_kubeconfig = os.environ.get("KUBECONFIG")
    existing = os.environ.get(EXISTING_CLUSTER_ENV)
    control_plane = None
    if existing:
        kubeconfig = str(Path(existing).absolute())
    else:
        _binaries_or_skip()
        control_plane = ControlPlane(tmp_path_factory.mktemp("cluster"))
        control_plane.start()
        kubeconfig = str(control_plane.kubeconfig)
    os.environ["KUBECONFIG"] = kubeconfig
    try:
        yield Kube(kubeconfig, control_plane, _server_minor_version(kubeconfig) < 24)
    finally:
        if control_plane is not None:
            control_plane.remove()  # its folder too: a kept base folder must not hold a cluster
        if previous_kubeconfig is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = previous_kubeconfig


@pytest.fixture
def namespace(kube: Kube, request: pytest.FixtureRequest) -> Iterator[str]:
    """A namespace named after the test, whose default ServiceAccount can already run pods."""
    name = namespace_name(request.node.name)
    core = kubernetes.client.CoreV1Api(kube.api_client())
    core.create_namespace({"metadata": {"name": name}})
    _wait_for_default_service_account(core, name, kube.waits_for_token_secrets)
    yield name
    try:
        core.delete_namespace(name)  # finishes in the background
    except ApiException as error:
        if error.status != 404:
            raise


def namespace_name(test_name: str) -> str:
    """A valid DNS label from a test's name, unique per call: `test_foo[bar]` -> `test-foo-bar-1a2b3c`."""
    slug = re.sub(r"[^a-z0-9]+", "-", test_name.lower()).strip("-")[:48].strip("-") or "test"
    return f"{slug}-{secrets.token_hex(3)}"


def _binaries_or_skip() -> None:
    try:
        ensure_binaries()
    except ClusterError as error:
        if os.environ.get(REQUIRE_CLUSTER_ENV):
            raise
        pytest.skip(
            f"no Kubernetes binaries for the embedded cluster ({error}); "
            f"set {REQUIRE_CLUSTER_ENV}=1 to make this a failure"
        )


def _server_minor_version(kubeconfig: str) -> int:
    version = kubernetes.client.VersionApi(kubernetes.config.new_client_from_config(config_file=kubeconfig)).get_code()
    return int(re.match(r"\d+", version.minor).group())


def _wait_for_default_service_account(core: kubernetes.client.CoreV1Api, namespace: str, with_token: bool) -> None:
    """Pods are refused until the namespace's default ServiceAccount exists (and, before 1.24, its token)."""
    deadline = time.monotonic() + NAMESPACE_READY_SECONDS
    while time.monotonic() < deadline:
        try:
            if core.read_namespaced_service_account("default", namespace).secrets or not with_token:
                return
        except ApiException as error:
            if error.status != 404:
                raise
        time.sleep(0.05)
    raise AssertionError(f"namespace {namespace}: no default ServiceAccount token after {NAMESPACE_READY_SECONDS}s")
