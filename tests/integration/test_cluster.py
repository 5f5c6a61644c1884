"""The embedded control plane does what the operator relies on: TLS that clients verify, RBAC,
ServiceAccount tokens, garbage collection, namespace deletion; and `cluster up`/`down` work, the real
node included: up imports the project's images, down leaves no process, mount, namespace, link, cgroup or
file, and one node runs per machine."""

from __future__ import annotations

import os
import secrets

import kubernetes
import pytest
from kubernetes.client.rest import ApiException

from finetune_dev.cluster import processes
from finetune_dev.cluster.controlplane import PROCESS_NAMES, ControlPlane, cluster_down, cluster_up, export_lines
from finetune_dev.cluster.errors import ClusterError
from finetune_dev.cluster.node import COMPONENTS, MACHINE_CLAIM, Node, check_prerequisites, leftovers
from finetune_dev.cluster.runtime import has_image
from finetune_dev.harness import kubectl, wait_for
from finetune_dev.images import image_refs

pytestmark = pytest.mark.integration


@pytest.fixture
def core(kube):
    return kubernetes.client.CoreV1Api(kube.api_client())


def embedded_only(kube) -> None:
    if kube.control_plane is None:
        pytest.skip("tests the embedded control plane; this session uses an existing cluster")


def test_the_api_server_serves_kubectl_and_the_python_client_over_verified_tls(kube):
    embedded_only(kube)
    version = kubernetes.client.VersionApi(kube.api_client()).get_code()
    assert version.git_version == "v1.20.2"
    assert kubectl("get", "--raw", "/readyz", kubeconfig=kube.kubeconfig).stdout == "ok"


def test_rbac_forbids_a_service_account_what_it_was_not_granted(kube, core, namespace):
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "reader"}})
    rbac = kubernetes.client.RbacAuthorizationV1Api(kube.api_client())
    rbac.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": "pod-reader"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}],
        },
    )
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "reader-reads-pods"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
        },
    )
    token_request = core.create_namespaced_service_account_token("reader", namespace, {"spec": {"audiences": []}})
    as_reader = kubernetes.client.CoreV1Api(client_with_token(kube, token_request.status.token))

    as_reader.list_namespaced_pod(namespace)  # granted
    with pytest.raises(ApiException) as refused:
        as_reader.list_namespaced_secret(namespace)
    assert refused.value.status == 403


def test_deleting_an_owner_deletes_what_it_owns(core, namespace):
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    owner_reference = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "owned", "ownerReferences": [owner_reference]}})

    core.delete_namespaced_config_map("owner", namespace)

    wait_for(lambda: not config_map_exists(core, namespace, "owned"), 30, what="the garbage collector")


def test_a_deleted_namespace_goes_away(core):
    name = f"short-lived-{secrets.token_hex(3)}"
    core.create_namespace({"metadata": {"name": name}})
    core.create_namespaced_config_map(name, {"metadata": {"name": "contents"}})

    core.delete_namespace(name)

    wait_for(lambda: not namespace_exists(core, name), 60, what="the namespace controller")


def test_cluster_up_and_down_beside_the_session_cluster(kube, tmp_path):
    embedded_only(kube)
    kubeconfig = cluster_up(tmp_path, with_node=True)
    try:
        assert cluster_up(tmp_path) == kubeconfig  # already up: nothing to do
        trainer = image_refs()["trainer"]
        assert export_lines(tmp_path) == [
            f"export KUBECONFIG={kubeconfig}",
            f"export FINETUNE_OPERATOR_TRAINER_IMAGE={trainer} FINETUNE_OPERATOR_IMAGE_PULL_POLICY=Never",
        ]
        nodes = kubectl("get", "nodes", "-o", "name", kubeconfig=str(kubeconfig))
        assert nodes.stdout.split() == ["node/local-node"]
        control_plane = ControlPlane(tmp_path)
        node = control_plane.node()
        assert [has_image(node.containerd_address, ref) for ref in image_refs().values()] == [True, True]
        pids = [processes.running_pid(control_plane.folder / "run" / f"{name}.pid") for name in PROCESS_NAMES]
        pids += [processes.running_pid(control_plane.node().pid_path(name)) for name in COMPONENTS]
        assert all(pids)
        assert leftovers(control_plane.node_folder)  # it has mounts, a network and cgroups while it runs

        other = ControlPlane(tmp_path / "other")
        with pytest.raises(ClusterError, match="another embedded cluster's node runs on this machine"):
            cluster_up(other.folder, with_node=True)
        assert not other.is_running()  # a failed `cluster up` leaves nothing running
    finally:
        cluster_down(tmp_path)

    assert not control_plane.is_running()
    assert all(processes.start_time(pid) is None for pid in pids)
    assert leftovers(control_plane.node_folder) == []
    assert not MACHINE_CLAIM.exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["other"]  # down deleted what it made


def client_with_token(kube, token: str) -> kubernetes.client.ApiClient:
    """A client for the session's API server that authenticates with `token` alone."""
    admin = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=kube.kubeconfig, client_configuration=admin)
    configuration = kubernetes.client.Configuration(host=admin.host, api_key={"authorization": f"Bearer {token}"})
    configuration.ssl_ca_cert = admin.ssl_ca_cert
    return kubernetes.client.ApiClient(configuration)


def config_map_exists(core, namespace: str, name: str) -> bool:
    try:
        core.read_namespaced_config_map(name, namespace)
    except ApiException as error:
        if error.status == 404:
            return False
        raise
    return True


def namespace_exists(core, name: str) -> bool:
    try:
        core.read_namespace(name)
    except ApiException as error:
        if error.status == 404:
            return False
        raise
    return True


def test_a_missing_package_is_named_not_waited_on(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ClusterError, match=r"apt-get install containerd dnsmasq-base iproute2 mount procps runc$"):
        check_prerequisites()


def test_a_component_that_fails_to_start_stops_the_node_in_one_line_naming_its_log(kube, tmp_path, monkeypatch):
    embedded_only(kube)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "containerd").write_text("#!/bin/sh\necho 'containerd: simulated failure'\nexit 1\n")
    (fake / "containerd").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    node = Node(tmp_path / "node", kube.control_plane.pki, kube.control_plane.kubeconfig)

    with pytest.raises(ClusterError) as failed:
        node.start()

    log = node.log_path("containerd")
    assert str(failed.value) == f"containerd exited during startup: containerd: simulated failure (log: {log})"
    assert leftovers(node.folder) == []
    assert not MACHINE_CLAIM.exists()
