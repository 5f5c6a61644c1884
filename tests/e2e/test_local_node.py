"""The local node runs real pods: env from the downward API, volumes, pod DNS names, exit codes and
termination messages, mount points kept off the host, deletion with SIGTERM, GPU scheduling, claims,
and an agent restart."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import kubernetes
import pytest
from kubernetes.client.rest import ApiException

from tests.support import wait_for

pytestmark = pytest.mark.e2e

REPORT_ENV_AND_DNS = textwrap.dedent(
    """
    import json, os, socket
    seen = {name: os.environ[name] for name in ("POD_NAME", "POD_NAMESPACE", "POD_UID", "POD_IP", "NODE_NAME",
                                                 "ROLE", "GREETING")}
    seen["config_file"] = open("/etc/demo/greeting").read()
    seen["peer_ip"] = socket.gethostbyname(f"peer.group.{seen['POD_NAMESPACE']}.svc")
    seen["peer_ip_short"] = socket.gethostbyname("peer.group")
    seen["hostname"] = socket.gethostname()
    print("report:", json.dumps(seen), flush=True)
    with open("/dev/termination-log", "w") as message:
        json.dump(seen, message)
    raise SystemExit(3)
    """
)

WAIT_FOR_SIGTERM = textwrap.dedent(
    """
    import signal, sys, time
    def stop(*_):
        print("got SIGTERM", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    print("waiting", flush=True)
    while True:
        time.sleep(1)
    """
)


@pytest.fixture
def core(kube, local_node):
    return kubernetes.client.CoreV1Api(kube.api_client())


def python_pod(name: str, script: str, **spec: object) -> dict:
    container = {"name": "main", "image": "local", "command": ["python", "-c", script]}
    container.update(spec.pop("container", {}))
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"role": name}},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 30,
            "nodeSelector": {"finetune.dev/local-node": "true"},  # not another node of an existing cluster
            "containers": [container],
            **spec,
        },
    }


def field_env(name: str, field_path: str) -> dict:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": field_path}}}


def gpu_limits(count: int) -> dict:
    return {"resources": {"limits": {"nvidia.com/gpu": str(count)}}}


def phase(core, namespace: str, name: str, wanted: str):
    pod = core.read_namespaced_pod(name, namespace)
    return pod if pod.status.phase == wanted else None


def ready(core, namespace: str, name: str):
    pod = core.read_namespaced_pod(name, namespace)
    conditions = {c.type: c.status for c in pod.status.conditions or []}
    return pod if conditions.get("Ready") == "True" else None


def gone(core, namespace: str, name: str) -> bool:
    try:
        core.read_namespaced_pod(name, namespace)
    except ApiException as error:
        return error.status == 404
    return False


def test_a_pod_sees_its_env_volumes_and_peers_and_reports_how_it_ended(core, namespace, local_node):
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "demo"}, "data": {"greeting": "hello"}})
    core.create_namespaced_pod(namespace, python_pod("peer", WAIT_FOR_SIGTERM, hostname="peer", subdomain="group"))
    peer = wait_for(lambda: ready(core, namespace, "peer"), 30, what="the peer pod to be ready")

    env = [
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        field_env("POD_UID", "metadata.uid"),
        field_env("POD_IP", "status.podIP"),
        field_env("NODE_NAME", "spec.nodeName"),
        field_env("ROLE", "metadata.labels['role']"),
        {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "demo", "key": "greeting"}}},
    ]
    reporter = python_pod(
        "reporter",
        REPORT_ENV_AND_DNS,
        hostname="reporter",
        subdomain="group",
        container={"env": env, "volumeMounts": [{"name": "demo", "mountPath": "/etc/demo", "readOnly": True}]},
        volumes=[{"name": "demo", "configMap": {"name": "demo"}}],
    )
    created = core.create_namespaced_pod(namespace, reporter)

    pod = wait_for(lambda: phase(core, namespace, "reporter", "Failed"), 30, what="the reporter to fail")
    terminated = pod.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason) == (3, "Error")
    seen = json.loads(terminated.message)
    assert seen == {
        "POD_NAME": "reporter",
        "POD_NAMESPACE": namespace,
        "POD_UID": created.metadata.uid,
        "POD_IP": pod.status.pod_ip,
        "NODE_NAME": local_node.name,
        "ROLE": "reporter",
        "GREETING": "hello",
        "config_file": "hello",
        "peer_ip": peer.status.pod_ip,
        "peer_ip_short": peer.status.pod_ip,
        "hostname": "reporter",
    }
    assert pod.status.pod_ip != peer.status.pod_ip
    assert "report:" in local_node.pod_log_path(namespace, "reporter", "main").read_text()


def test_logs_stand_in_for_an_empty_termination_message(core, namespace, local_node):
    failing = python_pod(
        "failing",
        "import sys; print('dataset not found'); sys.exit(2)",
        container={"terminationMessagePolicy": "FallbackToLogsOnError"},
    )
    core.create_namespaced_pod(namespace, failing)
    pod = wait_for(lambda: phase(core, namespace, "failing", "Failed"), 30, what="the pod to fail")
    terminated = pod.status.container_statuses[0].state.terminated
    assert terminated.exit_code == 2
    assert terminated.message.strip() == "dataset not found"


def test_mount_points_the_host_lacks_exist_only_inside_the_pod(core, namespace, local_node):
    config_dir, data_dir = Path(f"/etc/{namespace}"), Path(f"/{namespace}/data")
    script = textwrap.dedent(
        f"""
        import os, sys
        open("{data_dir}/written", "w").write("in the volume")
        open("/tmp/scratch", "w").write("in the emptyDir at /tmp")
        open("/dev/termination-log", "w").write(os.listdir("{config_dir}")[0])
        sys.exit(3)
        """
    )
    isolated = python_pod(
        "isolated",
        script,
        container={
            "volumeMounts": [
                {"name": "scratch", "mountPath": "/tmp"},  # covers the node's folder (under /tmp in tests)
                {"name": "config", "mountPath": str(config_dir)},
                {"name": "data", "mountPath": str(data_dir)},
            ]
        },
        volumes=[
            {"name": "scratch", "emptyDir": {}},
            {"name": "config", "configMap": {"name": "isolated"}},
            {"name": "data", "emptyDir": {}},
        ],
    )
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "isolated"}, "data": {"key": "value"}})
    core.create_namespaced_pod(namespace, isolated)

    pod = wait_for(lambda: phase(core, namespace, "isolated", "Failed"), 30, what="the pod to fail")
    terminated = pod.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.message) == (3, "key")
    assert not config_dir.exists() and not data_dir.parent.exists()


def test_a_deleted_pod_gets_sigterm_and_is_removed(core, namespace, local_node):
    core.create_namespaced_pod(namespace, python_pod("stoppable", WAIT_FOR_SIGTERM))
    wait_for(lambda: ready(core, namespace, "stoppable"), 30, what="the pod to be ready")
    log = local_node.pod_log_path(namespace, "stoppable", "main")
    # Ready means started, not that Python has installed its handler yet: it says so in the log.
    wait_for(lambda: log.exists() and "waiting" in log.read_text(), 30, what="the SIGTERM handler")

    core.delete_namespaced_pod("stoppable", namespace)  # 30 s grace: only SIGTERM ends it this fast

    wait_for(lambda: gone(core, namespace, "stoppable"), 15, what="the pod to be removed")
    assert "got SIGTERM" in local_node.pod_log_path(namespace, "stoppable", "main").read_text()


def test_gpu_requests_schedule_within_the_node_capacity(core, namespace, local_node):
    node = core.read_node(local_node.name)
    assert node.status.allocatable["nvidia.com/gpu"] == "8"
    core.create_namespaced_pod(namespace, python_pod("one-gpu", "pass", container=gpu_limits(1)))
    core.create_namespaced_pod(namespace, python_pod("nine-gpus", "pass", container=gpu_limits(9)))

    wait_for(lambda: phase(core, namespace, "one-gpu", "Succeeded"), 30, what="the 1-GPU pod to succeed")

    def unschedulable():
        conditions = core.read_namespaced_pod("nine-gpus", namespace).status.conditions or []
        return any(c.type == "PodScheduled" and c.reason == "Unschedulable" for c in conditions)

    wait_for(unschedulable, 30, what="the 9-GPU pod to be unschedulable")


def test_a_claim_gets_a_local_volume_that_outlives_the_pod(core, namespace, local_node):
    claim = {
        "metadata": {"name": "runs"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    core.create_namespaced_persistent_volume_claim(namespace, claim)
    writer = python_pod(
        "writer",
        "open('/runs/out.txt', 'w').write('saved')",
        container={"volumeMounts": [{"name": "runs", "mountPath": "/runs"}]},
        volumes=[{"name": "runs", "persistentVolumeClaim": {"claimName": "runs"}}],
    )
    core.create_namespaced_pod(namespace, writer)

    wait_for(lambda: phase(core, namespace, "writer", "Succeeded"), 30, what="the writer to succeed")
    assert (local_node.folder / "volumes" / "pvc" / namespace / "runs" / "out.txt").read_text() == "saved"


def test_a_restarted_agent_adopts_running_pods(core, namespace, local_node):
    core.create_namespaced_pod(namespace, python_pod("survivor", WAIT_FOR_SIGTERM))
    before = wait_for(lambda: ready(core, namespace, "survivor"), 30, what="the pod to be ready")

    local_node.stop_agent()
    local_node.start()

    after = wait_for(lambda: ready(core, namespace, "survivor"), 30, what="the pod to stay ready")
    status_before, status_after = before.status.container_statuses[0], after.status.container_statuses[0]
    assert (status_after.container_id, status_after.restart_count) == (status_before.container_id, 0)
    core.delete_namespaced_pod("survivor", namespace)
    wait_for(lambda: gone(core, namespace, "survivor"), 15, what="the adopted pod to be removed")
    log = local_node.pod_log_path(namespace, "survivor", "main").read_text()
    assert log.count("waiting") == 1 and "got SIGTERM" in log
