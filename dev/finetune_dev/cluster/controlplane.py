"""The embedded control plane: etcd, kube-apiserver, kube-controller-manager and kube-scheduler on
127.0.0.1, on ports free at start, so that several clusters (tests, `make demo`) can run side by side.

Everything a cluster has lives in its folder (`cluster_down` deletes it, keep=False), but the images,
which its node keeps in the machine's shared store (runtime.py):

    kubeconfig          admin kubeconfig (token in group system:masters; CA data, no insecure-skip)
    cluster.json        the ports in use
    kubectl-cache/      kubectl's discovery cache, when the harness or the demo ran kubectl
    pki/                CA, serving certificate, service-account keys, token file
    etcd/               etcd's data: a restarted cluster keeps its objects
    logs/<process>.log  run/<process>.pid
    node/               the node's folder (see node.py), when started with a node

`cluster_up`/`cluster_down` drive detached processes for the CLI; `ControlPlane` is the same for
in-process use (pytest), its processes dying with the caller.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import yaml

from finetune_dev.cluster import processes
from finetune_dev.cluster.build import ensure_binaries, find_etcd
from finetune_dev.cluster.disk import check_free_space
from finetune_dev.cluster.errors import ClusterError
from finetune_dev.cluster.node import Node, remove_folder
from finetune_dev.cluster.pki import SERVICE_CLUSTER_IP_RANGE, Pki, ensure_pki
from finetune_dev.images import ensure_images, image_refs

STARTUP_TIMEOUT_SECONDS = 90.0
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
# Stopped in this order: clients before the servers they talk to.
PROCESS_NAMES = ("kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd")
# What a cluster makes in its folder: all that `cluster_down` deletes (the folder may hold other files).
MADE = ("kubeconfig", "kubeconfig.partial", "cluster.json", "pki", "etcd", "logs", "run", "node", "kubectl-cache")


class ControlPlane:
    """One embedded control plane in `folder`; also a context manager (start on enter, stop on exit)."""

    def __init__(self, folder: Path, *, detach: bool = False):
        self.folder = Path(folder).absolute()
        self.detach = detach
        self.pki = Pki(self.folder / "pki")
        self._children: list[subprocess.Popen] = []
        self._started: list[str] = []

    @property
    def kubeconfig(self) -> Path:
        return self.folder / "kubeconfig"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self._ports()['apiserver']}"

    @property
    def admin_token(self) -> str:
        return self.pki.admin_token

    @property
    def node_folder(self) -> Path:
        return self.folder / "node"

    def node(self, *, detach: bool = False) -> Node:
        """This cluster's node (node.py); start it after the control plane."""
        return Node(self.node_folder, self.pki, self.kubeconfig, detach=detach)

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self, timeout: float = STARTUP_TIMEOUT_SECONDS) -> None:
        """Start all four processes and return once the API server serves and default/default exists."""
        bin_dir = ensure_binaries()
        etcd = find_etcd(bin_dir)
        self.folder.mkdir(parents=True, exist_ok=True)
        ensure_pki(self.pki.folder)
        ports = self._choose_ports()
        (self.folder / "cluster.json").write_text(json.dumps({"ports": ports}, indent=2) + "\n")
        self._write_kubeconfig()
        try:
            self._start_processes(bin_dir, etcd, ports, time.monotonic() + timeout)
        except BaseException:
            self.stop()  # leave no half-started cluster behind
            raise

    def _start_processes(self, bin_dir: Path, etcd: Path, ports: dict[str, int], deadline: float) -> None:
        self._start("etcd", [etcd, *self._etcd_flags(ports)])
        self._start("kube-apiserver", [bin_dir / "kube-apiserver", *self._apiserver_flags(ports)])
        # The controller-manager gives up if the API server is not healthy within 10 s of its start.
        self._wait("the API server to be ready", self._apiserver_ready, deadline)
        self._start("kube-controller-manager", [bin_dir / "kube-controller-manager", *self._controller_manager_flags()])
        self._start("kube-scheduler", [bin_dir / "kube-scheduler", *self._scheduler_flags()])
        # Until the token controller has given it a token, the ServiceAccount admission plugin refuses pods.
        self._wait("the default ServiceAccount and its token", self._default_service_account_ready, deadline)

    def stop(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL after a grace period); the folder is kept."""
        for name in PROCESS_NAMES:
            processes.stop(self._pid_path(name))
        for child in self._children:
            child.wait()  # reap, so no zombie outlives the test session
        self._children.clear()
        self._started.clear()

    def remove(self) -> None:
        """Stop it and delete what it made in its folder, then the folder if nothing else is left there."""
        self.stop()
        for name in MADE:
            remove_folder(self.folder / name)
        with contextlib.suppress(OSError):
            self.folder.rmdir()

    def is_running(self) -> bool:
        """True if all four processes run and the API server answers."""
        if not all(processes.running_pid(self._pid_path(name)) for name in PROCESS_NAMES):
            return False
        return self._apiserver_ready()

    def get(self, path: str) -> bytes:
        """GET path from the API server as admin (urllib errors propagate)."""
        request = urllib.request.Request(self.server + path, headers={"Authorization": f"Bearer {self.admin_token}"})
        context = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        with urllib.request.urlopen(request, context=context, timeout=5) as response:
            return response.read()

    def log_path(self, name: str) -> Path:
        return self.folder / "logs" / f"{name}.log"

    def _pid_path(self, name: str) -> Path:
        return self.folder / "run" / f"{name}.pid"

    def _start(self, name: str, argv: list) -> None:
        child = processes.start(
            argv, log_path=self.log_path(name), pid_path=self._pid_path(name), die_with_parent=not self.detach
        )
        self._started.append(name)
        if not self.detach:
            self._children.append(child)

    def _wait(self, what: str, ready: Callable[[], bool], deadline: float) -> None:
        while True:
            self._fail_if_any_exited()
            if ready():
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out waiting for {what}; logs in {self.folder / 'logs'}")
            time.sleep(0.1)

    def _fail_if_any_exited(self) -> None:
        for name in self._started:
            if processes.running_pid(self._pid_path(name)) is None:
                tail = "\n".join(self.log_path(name).read_text(errors="replace").splitlines()[-15:])
                raise ClusterError(f"{name} exited during startup; last lines of {self.log_path(name)}:\n{tail}")

    def _apiserver_ready(self) -> bool:
        try:
            return self.get("/readyz") == b"ok"
        except OSError:  # not listening yet, or an HTTP error while it starts
            return False

    def _default_service_account_ready(self) -> bool:
        try:
            account = json.loads(self.get("/api/v1/namespaces/default/serviceaccounts/default"))
        except OSError:
            return False
        return bool(account.get("secrets"))

    def _ports(self) -> dict[str, int]:
        try:
            return json.loads((self.folder / "cluster.json").read_text())["ports"]
        except (OSError, ValueError, KeyError) as error:
            raise ClusterError(f"no cluster in {self.folder}: start one with `finetune cluster up`") from error

    def _choose_ports(self) -> dict[str, int]:
        """Keep the previous ports when they are still free (etcd remembers its peer URL), else take new ones."""
        try:
            previous = self._ports()
        except ClusterError:
            previous = {}
        names = ("etcd_client", "etcd_peer", "apiserver")
        if set(previous) == set(names) and all(_port_is_free(port) for port in previous.values()):
            return previous
        return {name: _free_port() for name in names}

    def _write_kubeconfig(self) -> None:
        ca_data = base64.b64encode(self.pki.ca_cert.read_bytes()).decode()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "finetune", "cluster": {"server": self.server, "certificate-authority-data": ca_data}}
            ],
            "users": [{"name": "finetune-admin", "user": {"token": self.admin_token}}],
            "contexts": [{"name": "finetune", "context": {"cluster": "finetune", "user": "finetune-admin"}}],
            "current-context": "finetune",
        }
        partial = self.kubeconfig.with_name("kubeconfig.partial")
        partial.touch(mode=0o600)
        partial.write_text(yaml.safe_dump(config, sort_keys=False))
        partial.replace(self.kubeconfig)

    def _etcd_flags(self, ports: dict[str, int]) -> list[str]:
        client = f"http://127.0.0.1:{ports['etcd_client']}"
        peer = f"http://127.0.0.1:{ports['etcd_peer']}"
        return [
            "--name=default",
            f"--data-dir={self.folder / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=default={peer}",
            "--log-level=warn",
            "--logger=zap",
        ]

    def _apiserver_flags(self, ports: dict[str, int]) -> list[str]:
        return [
            f"--etcd-servers=http://127.0.0.1:{ports['etcd_client']}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={ports['apiserver']}",
            f"--tls-cert-file={self.pki.serving_cert}",
            f"--tls-private-key-file={self.pki.serving_key}",
            f"--token-auth-file={self.pki.token_file}",
            "--authorization-mode=Node,RBAC",
            # The kubelet serves logs and exec on 127.0.0.1 (its InternalIP) and trusts this client certificate.
            f"--kubelet-client-certificate={self.pki.kubelet_client_cert}",
            f"--kubelet-client-key={self.pki.kubelet_client_key}",
            "--kubelet-preferred-address-types=InternalIP",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={self.pki.service_account_public_key}",
            f"--service-account-signing-key-file={self.pki.service_account_key}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            "--allow-privileged=true",
            # Endpoints may not hold loopback addresses, so the `kubernetes` Service gets none; pods on
            # the node reach its address (10.0.0.1:443) through the node's forwarder (nodeservices.py).
            "--endpoint-reconciler-type=none",
            "--profiling=false",
        ]

    def _controller_manager_flags(self) -> list[str]:
        return [
            f"--kubeconfig={self.kubeconfig}",
            "--leader-elect=false",  # one instance; an election only delays the start
            "--port=0",
            "--secure-port=0",
            f"--service-account-private-key-file={self.pki.service_account_key}",
            f"--root-ca-file={self.pki.ca_cert}",
            f"--cluster-signing-cert-file={self.pki.ca_cert}",
            f"--cluster-signing-key-file={self.pki.ca_key}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            # Controllers share the admin credentials: per-controller ServiceAccounts would make every
            # start wait for a dozen tokens, and RBAC for workloads is enforced either way.
            "--use-service-account-credentials=false",
        ]

    def _scheduler_flags(self) -> list[str]:
        return [f"--kubeconfig={self.kubeconfig}", "--leader-elect=false", "--port=0", "--secure-port=0"]


def cluster_up(folder: Path, with_node: bool = True) -> Path:
    """Start the cluster in `folder` as detached processes (a no-op if it runs), its node with the project's
    images imported (built unless cached; see export_lines); return its kubeconfig."""
    if with_node:
        check_free_space(folder)
    control_plane = ControlPlane(folder, detach=True)
    restarted = not control_plane.is_running()
    if restarted:
        control_plane.stop()  # whatever part of an earlier cluster still runs
        control_plane.start()
    if with_node:
        node = control_plane.node(detach=True)
        try:
            if restarted or not node.is_running():
                node.start()  # stops first whatever an earlier node left (its components know the old port)
            ensure_images(str(node.containerd_address))  # an image imported before is kept as it is
        except ClusterError:
            if restarted:
                node.stop()
                control_plane.stop()  # a failed `cluster up` leaves nothing running
            raise
    return control_plane.kubeconfig


def cluster_down(folder: Path, keep: bool = False) -> None:
    """Stop the node (its containers, network and mounts go too) and the control plane, then delete what
    the cluster made in `folder` unless keep (its logs and etcd, to debug)."""
    control_plane = ControlPlane(folder)
    control_plane.node().stop()
    if keep:
        control_plane.stop()
    else:
        control_plane.remove()


def export_lines(folder: Path) -> list[str]:
    """Shell lines that point kubectl and the python client at the cluster in `folder` and, when it has a
    node, `finetune operator` at the images imported there (no registry behind them: never pull)."""
    control_plane = ControlPlane(folder)
    lines = [f"export KUBECONFIG={control_plane.kubeconfig}"]
    if control_plane.node_folder.is_dir():
        trainer = image_refs()["trainer"]
        lines.append(f"export FINETUNE_OPERATOR_TRAINER_IMAGE={trainer} FINETUNE_OPERATOR_IMAGE_PULL_POLICY=Never")
    return lines


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True
