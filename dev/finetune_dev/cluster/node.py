"""The local node agent: a development and test stand-in for a kubelet (like kwok, but it really runs
the pods). It registers a Node (with `nvidia.com/gpu` capacity, default 8), keeps its Ready condition
fresh, provisions local volumes for claims (provisioner.py), and runs every pod bound to it as local
processes (podworker.py), in their own mount namespaces, with a loopback pod IP and a hosts file that
resolves the pods' `<hostname>.<subdomain>.<ns>.svc` names (network.py).

    python -m finetune_dev.cluster.node --kubeconfig KUBECONFIG --dir NODE_DIR [--gpus 8]

Container output is in NODE_DIR/logs/<namespace>/<pod>/<container>.log (`kubectl logs` needs a
kubelet API this agent does not serve; see `pod_log_path`). Stopping the agent leaves its pods running,
as stopping a kubelet does; a restarted agent adopts them (LocalNode.stop stops both).

What differs from a kubelet, on purpose: there is no image: a pod sees the host's files (through a
root of bind mounts, see sandbox.py) and runs its command with this python's bin folder first on PATH;
pods share the host's ports and GPUs (no device assignment, no cgroup limits, so no OOMKilled reason
either); no probes, `kubectl exec/logs` or Service env variables; projected tokens are not refreshed.
Run it as root, or as a user where the kernel allows unprivileged user namespaces.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import urllib3
from kubernetes.client.rest import ApiException

from finetune_dev.cluster import processes
from finetune_dev.cluster.kubeapi import Kube
from finetune_dev.cluster.localnode import READY_MARKER, pod_log_path
from finetune_dev.cluster.network import PodNetwork
from finetune_dev.cluster.podworker import HOST_IP, NodeContext, PodWorker
from finetune_dev.cluster.provisioner import LocalPathProvisioner

log = logging.getLogger(__name__)

DEFAULT_NODE_NAME = "local-node"
DEFAULT_GPUS = 8
MAX_PODS = 110
HEARTBEAT_SECONDS = 10  # the node controller's grace period is 40 s
KUBELET_VERSION = "v1.20.2"
# A container image brings its own environment, so pods do not get the agent's. Passed through: what
# locates this host's tools and caches (PATH, HOME, Hugging Face caches) and its GPUs.
INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "PYTHONPATH")
INHERITED_ENV_PREFIXES = ("HF_", "TRANSFORMERS_", "CUDA_", "NVIDIA_")
TERMINAL_PHASES = ("Succeeded", "Failed")

__all__ = ["NodeAgent", "main", "pod_log_path"]


class NodeAgent:
    def __init__(self, kube: Kube, node_dir: Path, node_name: str, capacity: dict[str, str]):
        self.kube = kube
        self.node_dir = node_dir
        self.node_name = node_name
        self.capacity = capacity
        self.workers: dict[str, PodWorker] = {}
        self.context = NodeContext(
            kube=kube,
            node_name=node_name,
            node_dir=node_dir,
            network=PodNetwork(Path("/etc/hosts").read_text()),
            allocatable=capacity,
            base_env=container_base_env(kube.server),
        )
        self.ready_since = _now()

    def run(self, stop: threading.Event) -> None:
        """Register the node, then serve until stop is set."""
        self.register()
        (self.node_dir / READY_MARKER).write_text(f"{os.getpid()}\n")
        log.info("node %s registered; running pods in %s", self.node_name, self.node_dir)
        _in_thread("heartbeat", self._heartbeat, stop)
        _in_thread("provisioner", LocalPathProvisioner(self.kube, self.node_dir).run, stop)
        _in_thread("pods", self._serve_pods, stop)
        stop.wait()

    def register(self) -> None:
        if self.kube.read_node(self.node_name) is None:
            self.kube.create_node(self.node_object())
        self.kube.patch_node_status(self.node_name, self.node_object()["status"])

    def node_object(self) -> dict:
        now = _now()
        conditions = [
            ("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
            ("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            ("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            ("Ready", "True", "KubeletReady", "local node agent is posting ready status"),
        ]
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.node_name,
                "labels": {
                    "kubernetes.io/hostname": self.node_name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": _architecture(),
                    "finetune.dev/local-node": "true",
                },
            },
            "status": {
                "capacity": self.capacity,
                "allocatable": self.capacity,
                "conditions": [
                    {
                        "type": kind,
                        "status": status,
                        "reason": reason,
                        "message": message,
                        "lastHeartbeatTime": now,
                        "lastTransitionTime": self.ready_since,
                    }
                    for kind, status, reason, message in conditions
                ],
                "addresses": [
                    {"type": "InternalIP", "address": HOST_IP},
                    {"type": "Hostname", "address": self.node_name},
                ],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
                "nodeInfo": {
                    "machineID": _read_first_line("/etc/machine-id"),
                    "systemUUID": "",
                    "bootID": _read_first_line("/proc/sys/kernel/random/boot_id"),
                    "kernelVersion": platform.release(),
                    "osImage": _os_image(),
                    "containerRuntimeVersion": "finetune-local://1",
                    "kubeletVersion": KUBELET_VERSION,
                    "kubeProxyVersion": KUBELET_VERSION,
                    "operatingSystem": "linux",
                    "architecture": _architecture(),
                },
            },
        }

    def _heartbeat(self, stop: threading.Event) -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            try:
                self.kube.patch_node_status(self.node_name, self.node_object()["status"])
            except ApiException as error:
                if error.status == 404:  # someone deleted the Node: register again, as a kubelet does
                    self.register()
                else:
                    log.warning("heartbeat failed: %s", error.reason)
            except (urllib3.exceptions.HTTPError, OSError) as error:
                log.warning("heartbeat failed: %s", error)

    def _serve_pods(self, stop: threading.Event) -> None:
        self.kube.watch_pods_on_node(self.node_name, self._on_pod, stop)

    def _on_pod(self, event_type: str, pod: dict) -> None:
        try:
            self._sync_pod(event_type, pod)
        except ApiException as error:
            log.warning("pod %s/%s: %s", pod["metadata"]["namespace"], pod["metadata"]["name"], error.reason)

    def _sync_pod(self, event_type: str, pod: dict) -> None:
        uid = pod["metadata"]["uid"]
        worker = self.workers.get(uid)
        if event_type == "DELETED":
            if worker is not None:
                del self.workers[uid]
                worker.pod_deleted()
            else:  # finished before an agent restart: only its files are left
                shutil.rmtree(self.node_dir / "pods" / uid, ignore_errors=True)
            return
        if pod["metadata"].get("deletionTimestamp"):
            self._on_pod_deleting(pod, worker)
        elif worker is None and (pod.get("status") or {}).get("phase") not in TERMINAL_PHASES:
            self._start_worker(pod)

    def _on_pod_deleting(self, pod: dict, worker: PodWorker | None) -> None:
        metadata = pod["metadata"]
        if worker is None:
            if (pod.get("status") or {}).get("phase") in TERMINAL_PHASES:
                self.kube.delete_pod_now(metadata["namespace"], metadata["name"], metadata["uid"])
                return
            worker = self._start_worker(pod)  # adopts what an earlier agent started, then stops it
        if not worker.terminate(metadata.get("deletionGracePeriodSeconds")):
            self.kube.delete_pod_now(metadata["namespace"], metadata["name"], metadata["uid"])

    def _start_worker(self, pod: dict) -> PodWorker:
        worker = PodWorker(pod, self.context)
        self.workers[pod["metadata"]["uid"]] = worker
        worker.start()
        return worker

    def collect_orphans(self) -> None:
        """Stop and remove what pods deleted while the agent was down left behind."""
        pods_dir = self.node_dir / "pods"
        if not pods_dir.is_dir():
            return
        # Any pod still bound here lists its uid; anything else is an orphan.
        live = {pod["metadata"]["uid"] for pod in self.kube.list_pods_on_node(self.node_name)}
        for pod_dir in pods_dir.iterdir():
            if pod_dir.name not in live:
                for pid_file in pod_dir.glob("*.pid"):
                    processes.stop(pid_file, grace_seconds=5)
                shutil.rmtree(pod_dir, ignore_errors=True)
                log.info("removed orphaned pod folder %s", pod_dir)


def container_base_env(api_server_url: str) -> dict[str, str]:
    """The environment every container starts from: this python's bin folder first on PATH (so that
    `python` and `finetune` are this installation's), and the API server where a kubelet puts it."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name in INHERITED_ENV or name.startswith(INHERITED_ENV_PREFIXES)
    }
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
    host, _, port = api_server_url.removeprefix("https://").partition(":")
    port = port or "443"
    env.update(
        {
            "KUBERNETES_SERVICE_HOST": host,
            "KUBERNETES_SERVICE_PORT": port,
            "KUBERNETES_SERVICE_PORT_HTTPS": port,
            "KUBERNETES_PORT": f"tcp://{host}:{port}",
        }
    )
    return env


def default_capacity(node_dir: Path, gpus: int = DEFAULT_GPUS, cpu: int | None = None) -> dict[str, str]:
    memory_kib = next(
        line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal:")
    )
    node_dir.mkdir(parents=True, exist_ok=True)
    return {
        "cpu": str(cpu or os.cpu_count() or 1),
        "memory": f"{memory_kib}Ki",
        "ephemeral-storage": str(shutil.disk_usage(node_dir).total),
        "pods": str(MAX_PODS),
        "nvidia.com/gpu": str(gpus),
    }


def _in_thread(name: str, target: Callable[[threading.Event], None], stop: threading.Event) -> None:
    """Run target(stop) in a daemon thread; if it fails, the whole agent stops (and its supervisor sees it)."""

    def guarded() -> None:
        try:
            target(stop)
        except Exception:
            log.exception("%s failed; stopping the node agent", name)
            stop.set()

    threading.Thread(target=guarded, name=name, daemon=True).start()


def _architecture() -> str:
    """Go's name for this machine's architecture, as Kubernetes labels use it."""
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def _os_image() -> str:
    try:
        return platform.freedesktop_os_release().get("PRETTY_NAME", "Linux")
    except OSError:
        return "Linux"


def _read_first_line(path: str) -> str:
    try:
        return Path(path).read_text().split("\n", 1)[0].strip()
    except OSError:
        return ""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune_dev.cluster.node", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--dir", type=Path, required=True, help="the node's folder: pods, volumes, logs")
    parser.add_argument("--name", default=DEFAULT_NODE_NAME, help="the Node's name (default %(default)s)")
    parser.add_argument("--gpus", type=int, default=DEFAULT_GPUS, help="nvidia.com/gpu capacity (default %(default)s)")
    parser.add_argument("--cpu", type=int, default=None, help="cpu capacity (default: this host's cores)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    node_dir = args.dir.absolute()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    agent = NodeAgent(Kube(args.kubeconfig), node_dir, args.name, default_capacity(node_dir, args.gpus, args.cpu))
    agent.collect_orphans()
    agent.run(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
