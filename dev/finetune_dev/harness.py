"""Helpers shared by the cluster tests and the benchmarks: waiting on conditions, kubectl, the CRD, jobs, the
operator process. Dev-only (never in an image), so that bench/ needs nothing from tests/."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import kubernetes
import yaml
from kubernetes.client import ApiException

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / "finetunejobs.finetune.dev.yaml"
GROUP, VERSION, PLURAL = "finetune.dev", "v1alpha1", "finetunejobs"

T = TypeVar("T")


def wait_for(probe: Callable[[], T | None], timeout: float = 60, interval: float = 0.2, what: str = "condition") -> T:
    """Poll probe until it returns something truthy; fail with `what` after timeout seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def kubectl_binary() -> str:
    cached = Path.home() / ".cache" / "finetune-operator" / "k8s-v1.20.2" / "bin" / "kubectl"
    if cached.exists():
        return str(cached)
    found = shutil.which("kubectl")
    if not found:
        raise AssertionError("kubectl not found: run `make setup`")
    return found


def kubectl(*args: str, kubeconfig: str | None = None, input: str | None = None, check: bool = True):
    env = dict(os.environ)
    if kubeconfig:
        env["KUBECONFIG"] = kubeconfig
    # Discovery cached per cluster: ~/.kube/cache is keyed by host:port, and the embedded clusters of earlier
    # runs used the same loopback ports with other resources (kubectl then knows no `ftj` for 10 minutes).
    cache = Path(env.get("KUBECONFIG") or Path.home() / ".kube" / "config").parent / "kubectl-cache"
    command = [kubectl_binary(), f"--cache-dir={cache}", *args]
    result = subprocess.run(command, env=env, input=input, capture_output=True, text=True, timeout=60)
    if result.returncode != 0 and "doesn't have a resource type" in result.stderr:
        # Discovery cached before a test installed the CRD (kubectl 1.20 keeps it 10 minutes): drop it, ask again.
        shutil.rmtree(cache, ignore_errors=True)
        result = subprocess.run(command, env=env, input=input, capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
    return result


def install_crd(api_client: kubernetes.client.ApiClient, crd_file: Path = CRD_FILE) -> None:
    """Create or replace a CRD (the FineTuneJob one by default) and wait until it is served."""
    extensions = kubernetes.client.ApiextensionsV1Api(api_client)
    body = yaml.safe_load(crd_file.read_text())
    try:
        extensions.create_custom_resource_definition(body)
    except ApiException as e:
        if e.status != 409:
            raise
        current = extensions.read_custom_resource_definition(body["metadata"]["name"])
        body["metadata"]["resourceVersion"] = current.metadata.resource_version
        extensions.replace_custom_resource_definition(body["metadata"]["name"], body)

    def established() -> bool:
        crd = extensions.read_custom_resource_definition(body["metadata"]["name"])
        return any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or [])

    wait_for(established, 30, what="the CRD to be established")


def job_manifest(name: str, **spec: Any) -> dict[str, Any]:
    base = {
        "model": "/models/tiny",
        "dataset": {"path": "/data/train.jsonl"},
        "workers": 2,
        "gpusPerWorker": 1,
        "restartPolicy": {"maxRestarts": 3, "backoffSeconds": 0},
        "storage": {"emptyDir": {}},
    }
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {**base, **spec},
    }


class Jobs:
    """FineTuneJobs in one namespace through the real API."""

    def __init__(self, api_client: kubernetes.client.ApiClient, namespace: str) -> None:
        self.custom = kubernetes.client.CustomObjectsApi(api_client)
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.namespace = namespace

    def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, manifest)

    def get(self, name: str) -> dict[str, Any] | None:
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def patch(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name, {"spec": spec})

    def delete(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)

    def status(self, name: str) -> dict[str, Any]:
        return (self.get(name) or {}).get("status") or {}

    def wait_phase(self, name: str, phase: str, timeout: float = 60) -> dict[str, Any]:
        return wait_for(
            lambda: self.status(name) if self.status(name).get("phase") == phase else None,
            timeout,
            what=f"{name} to be {phase}",
        )

    def pods(self, name: str, attempt: int | None = None) -> list[Any]:
        selector = f"finetune.dev/job={name}"
        if attempt is not None:
            selector += f",finetune.dev/attempt={attempt}"
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=selector).items
        return sorted(pods, key=lambda p: p.metadata.name)

    def wait_pods(self, name: str, count: int, attempt: int | None = None, timeout: float = 60) -> list[Any]:
        def ready() -> list[Any] | None:
            pods = [p for p in self.pods(name, attempt) if not p.metadata.deletion_timestamp]
            return pods if len(pods) == count else None

        return wait_for(ready, timeout, what=f"{count} pods of {name} (attempt {attempt})")

    def events(self, name: str) -> list[Any]:
        events = self.core.list_namespaced_event(self.namespace, field_selector=f"involvedObject.name={name}").items
        return [e for e in events if e.involved_object.kind == "FineTuneJob"]

    def finish_pod(self, pod_name: str, exit_code: int, reason: str = "Error", message: str = "") -> None:
        """Report a worker's container as terminated, as a kubelet would."""
        phase = "Succeeded" if exit_code == 0 else "Failed"
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        terminated = {"exitCode": exit_code, "reason": reason, "message": message, "finishedAt": now}
        status = {
            "phase": phase,
            "containerStatuses": [
                {
                    "name": "trainer",
                    "ready": False,
                    "restartCount": 0,
                    "image": "trainer",
                    "imageID": "",
                    "state": {"terminated": terminated},
                }
            ],
        }
        self.core.patch_namespaced_pod_status(pod_name, self.namespace, {"status": status})

    def start_running(self, name: str, **spec: Any) -> list[Any]:
        """Create a job (job_manifest with `spec`) and report its first gang Running and Ready, as a kubelet
        would; once the job is Running, its pods."""
        self.create(job_manifest(name, **spec))
        pods = self.wait_pods(name, spec.get("workers", 2), attempt=0)
        for pod in pods:
            self.run_pod(pod.metadata.name)
        self.wait_phase(name, "Running")
        return pods

    def run_pod(self, pod_name: str) -> None:
        """Report a worker as running and ready, as a kubelet would."""
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        status = {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}],
            "containerStatuses": [
                {
                    "name": "trainer",
                    "ready": True,
                    "restartCount": 0,
                    "image": "trainer",
                    "imageID": "",
                    "state": {"running": {"startedAt": now}},
                }
            ],
        }
        self.core.patch_namespaced_pod_status(pod_name, self.namespace, {"status": status})


class OperatorProcess:
    """`python -m finetune_operator operator` as a real process, restartable and killable."""

    def __init__(self, kubeconfig: str, log_path: Path, extra_env: dict[str, str] | None = None) -> None:
        self.kubeconfig = kubeconfig
        self.log_path = log_path
        self.extra_env = extra_env or {}
        self.process: subprocess.Popen | None = None
        self.metrics_port = free_port()

    def start(self) -> None:
        env = dict(os.environ)
        env |= {
            "KUBECONFIG": self.kubeconfig,
            "FINETUNE_OPERATOR_METRICS_PORT": str(self.metrics_port),
            "FINETUNE_OPERATOR_HEALTH_PORT": "0",
            "FINETUNE_OPERATOR_LOG_LEVEL": "INFO",
            **self.extra_env,
        }
        log = self.log_path.open("a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "finetune_operator", "operator"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, as when a node dies under the operator."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""
