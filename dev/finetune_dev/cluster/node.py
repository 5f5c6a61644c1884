"""The embedded cluster's node: the real kubelet v1.20.2 over containerd 1.6 (CRI), runc, CNI bridge
networking (podnet.py) and cluster DNS, plus nodeservices.py (the pods' way to the API server, the DNS
hosts file, the local-path provisioner). It registers as Node `local-node` with `nvidia.com/gpu`
capacity (an extended resource patched into its status, so GPU requests schedule; no devices behind it).

Its files, under the node's folder:

    containerd/     config.toml, state, containerd.sock (its root, the images, is the machine's shared
                    store: runtime.shared_image_store())
    cni/            net.d (the CNI config), ipam (host-local's leases)
    kubelet/        config.yaml, kubeconfig, root (pods' volumes), pki (its self-signed serving cert)
    dns/hosts       the pods' names, read by dnsmasq
    volumes/pvc/    the claims' folders (provisioner.py)
    logs/<component>.log, run/<component>.pid

Only one node runs per machine (/var/log/pods, the `kubepods` cgroups and the network names are
global): /run/finetune-node names the folder of the one that runs. Needs root.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from kubernetes.client.rest import ApiException

from finetune_dev.cluster import podnet, processes, runtime
from finetune_dev.cluster.build import ensure_binaries
from finetune_dev.cluster.errors import ClusterError
from finetune_dev.cluster.kubeapi import Kube
from finetune_dev.cluster.kubelet import write_kubelet_files
from finetune_dev.cluster.nodeservices import READY_MARKER
from finetune_dev.cluster.pki import NODE_NAME, Pki

MACHINE_CLAIM = Path("/run/finetune-node")
START_TIMEOUT_SECONDS = 120.0
GPUS = 8
GPU_RESOURCE = "nvidia.com/gpu"
# Stopped in this order; containerd last, after the containers are gone.
COMPONENTS = ("kubelet", "node-services", "dnsmasq", "containerd")
# executable or file -> the Debian package that brings it
REQUIREMENTS = {
    "containerd": "containerd",
    "containerd-shim-runc-v2": "containerd",
    "ctr": "containerd",
    "runc": "runc",
    "dnsmasq": "dnsmasq-base",
    "ip": "iproute2",
    "mount": "mount",
    "sysctl": "procps",
    f"{runtime.CNI_BIN_DIR}/bridge": "containernetworking-plugins",
    f"{runtime.CNI_BIN_DIR}/host-local": "containernetworking-plugins",
    f"{runtime.CNI_BIN_DIR}/loopback": "containernetworking-plugins",
}
CGROUP_ROOTS = ("kubepods", "k8s.io")
POD_LOGS, CONTAINER_LOGS = Path("/var/log/pods"), Path("/var/log/containers")


class Node:
    """The node of the cluster whose control plane lives in cluster_folder (pki/, kubeconfig)."""

    def __init__(
        self,
        folder: Path,
        pki: Pki,
        admin_kubeconfig: Path,
        *,
        detach: bool = False,
        image_store: Path | None = None,
    ):
        self.folder = Path(folder).absolute()
        self.pki = pki
        self.admin_kubeconfig = Path(admin_kubeconfig).absolute()
        self.detach = detach
        self.image_store = Path(image_store or runtime.shared_image_store()).absolute()
        self.name = NODE_NAME
        self._children: list[subprocess.Popen] = []

    @property
    def containerd_dir(self) -> Path:
        return self.folder / "containerd"

    @property
    def containerd_address(self) -> Path:
        return runtime.socket_path(self.containerd_dir)

    def log_path(self, component: str) -> Path:
        return self.folder / "logs" / f"{component}.log"

    def pid_path(self, component: str) -> Path:
        return self.folder / "run" / f"{component}.pid"

    def container_pid(self, container_id: str) -> int | None:
        """The host pid of a running container's first process (container_id as in a pod's status,
        `containerd://ID` or ID), or None once it has stopped."""
        wanted = container_id.removeprefix("containerd://")
        for line in runtime.ctr(self.containerd_address, "tasks", "list", check=False).splitlines()[1:]:
            task, pid, state = [*line.split(), "", "", ""][:3]
            if task == wanted and state == "RUNNING":
                return int(pid)
        return None

    def is_running(self) -> bool:
        return all(processes.running_pid(self.pid_path(name)) for name in COMPONENTS)

    def start(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Start every component; return once the Node is Ready with its GPU capacity."""
        check_prerequisites()
        self._claim_machine()
        bin_dir = ensure_binaries(node=True)
        self.stop(release=False)  # whatever an earlier run left
        (self.folder / "run").mkdir(parents=True, exist_ok=True)
        (self.folder / "run" / "started").touch()  # pod logs made since are this node's
        deadline = time.monotonic() + timeout
        try:
            self._start_components(bin_dir, deadline)
        except BaseException:
            self.stop()
            raise

    def _start_components(self, bin_dir: Path, deadline: float) -> None:
        kube = Kube(self.admin_kubeconfig)
        podnet.write_cni_config(self.folder / "cni" / "net.d", self.folder / "cni" / "ipam")
        podnet.set_up()
        config = self.containerd_dir / "config.toml"
        config.parent.mkdir(parents=True, exist_ok=True)
        self.image_store.mkdir(parents=True, exist_ok=True)
        cni_conf_dir = self.folder / "cni" / "net.d"
        config.write_text(runtime.containerd_config(self.containerd_dir, cni_conf_dir, self.image_store))
        self._start("containerd", ["containerd", "--config", config])
        self._wait("containerd", self._containerd_ready, deadline)
        runtime.ensure_pause_image(self.containerd_address, bin_dir / "pause", self.folder)

        hosts = self.folder / "dns" / "hosts"
        hosts.parent.mkdir(parents=True, exist_ok=True)
        hosts.write_text("\n".join(podnet.hosts_lines([])) + "\n")
        self._start("dnsmasq", podnet.dnsmasq_argv(hosts))
        self._wait("dnsmasq", lambda: "started, version" in self._log_text("dnsmasq"), deadline)

        marker = self.folder / READY_MARKER
        marker.unlink(missing_ok=True)
        services = [sys.executable, "-m", "finetune_dev.cluster.nodeservices", "--kubeconfig", self.admin_kubeconfig]
        services += ["--dir", self.folder, "--node", self.name, "--dnsmasq-pid-file", self.pid_path("dnsmasq")]
        self._start("node-services", services)
        self._wait("node-services", marker.exists, deadline)

        flags = write_kubelet_files(
            self.folder / "kubelet",
            kube.server,
            self.pki,
            self.containerd_address,
            _free_port(),
            _free_port(),
        )
        self._start("kubelet", [bin_dir / "kubelet", *flags])
        self._wait("kubelet", lambda: _node_ready(kube, self.name), deadline)
        kube.patch_node_status(self.name, {"capacity": {GPU_RESOURCE: str(GPUS)}})
        self._wait("kubelet", lambda: _allocatable(kube, self.name).get(GPU_RESOURCE) == str(GPUS), deadline)

    def stop(self, release: bool = True) -> None:
        """Stop everything and remove what it made: containers, mounts, namespaces, links, cgroups. The
        machine-wide parts (network, cgroups) only if this node holds the machine or nobody does."""
        for name in COMPONENTS[:-1]:
            processes.stop(self.pid_path(name))
        if processes.running_pid(self.pid_path("containerd")):
            self._remove_containers()
        processes.stop(self.pid_path("containerd"))
        for child in self._children:
            child.wait()
        self._children.clear()
        for pid in _shims_of(self.containerd_address):
            processes.terminate_group(pid, 5.0)
        _unmount_under(self.folder)
        shutil.rmtree(self.containerd_dir / "state", ignore_errors=True)
        shutil.rmtree(self.folder / "cni" / "ipam", ignore_errors=True)
        holder = MACHINE_CLAIM.read_text().strip() if MACHINE_CLAIM.exists() else None
        if holder in (None, str(self.folder)):
            podnet.tear_down()
            _remove_cgroups()
            self._remove_pod_logs()
            if release:
                MACHINE_CLAIM.unlink(missing_ok=True)

    def remove(self) -> None:
        """Stop the node and delete its folder; the images stay in the shared store."""
        self.stop()
        remove_folder(self.folder)

    def _remove_containers(self) -> None:
        address = self.containerd_address
        for task in runtime.ctr(address, "tasks", "list", "--quiet", check=False).split():
            runtime.ctr(address, "tasks", "kill", "--signal", "SIGKILL", task, check=False)
            runtime.ctr(address, "tasks", "delete", "--force", task, check=False)
        containers = runtime.ctr(address, "containers", "list", "--quiet", check=False).split()
        if containers:
            runtime.ctr(address, "containers", "delete", *containers, check=False)

    def _remove_pod_logs(self) -> None:
        """The kubelet's pod logs (at paths fixed in 1.20) made since this node started."""
        started = self.folder / "run" / "started"
        if not started.exists():
            return
        since = started.stat().st_mtime
        for folder in POD_LOGS.glob("*_*_*"):
            if folder.stat().st_ctime >= since:
                shutil.rmtree(folder, ignore_errors=True)
        for link in CONTAINER_LOGS.glob("*.log"):
            if link.is_symlink() and not link.exists() and Path(os.readlink(link)).is_relative_to(POD_LOGS):
                link.unlink()
        started.unlink()

    def _claim_machine(self) -> None:
        if MACHINE_CLAIM.exists():
            other = Path(MACHINE_CLAIM.read_text().strip())
            if other != self.folder and Node(other, self.pki, self.admin_kubeconfig)._any_running():
                raise ClusterError(
                    f"another embedded cluster's node runs on this machine ({other}); one node per machine: "
                    f"stop it first (`finetune cluster down --dir {other.parent}`)"
                )
        MACHINE_CLAIM.write_text(f"{self.folder}\n")

    def _any_running(self) -> bool:
        return any(processes.running_pid(self.pid_path(name)) for name in COMPONENTS)

    def _start(self, name: str, argv: list) -> None:
        self.log_path(name).unlink(missing_ok=True)
        child = processes.start(
            argv, log_path=self.log_path(name), pid_path=self.pid_path(name), die_with_parent=not self.detach
        )
        if not self.detach:
            self._children.append(child)

    def _wait(self, name: str, ready: Callable[[], bool], deadline: float) -> None:
        while not ready():
            if processes.running_pid(self.pid_path(name)) is None:
                raise ClusterError(
                    f"{name} exited during startup: {self._last_line(name)} (log: {self.log_path(name)})"
                )
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"{name} did not become ready in time: {self._last_line(name)} (log: {self.log_path(name)})"
                )
            time.sleep(0.2)

    def _containerd_ready(self) -> bool:
        if not self.containerd_address.exists():
            return False
        probe = subprocess.run(["ctr", "--address", str(self.containerd_address), "version"], capture_output=True)
        return probe.returncode == 0

    def _log_text(self, name: str) -> str:
        try:
            return self.log_path(name).read_text(errors="replace")
        except OSError:
            return ""

    def _last_line(self, name: str) -> str:
        lines = [line for line in self._log_text(name).splitlines() if line.strip()]
        return lines[-1][-300:] if lines else "no output"


def check_prerequisites() -> None:
    """Name what is missing (root, a package, a kernel feature) instead of failing later."""
    if os.geteuid() != 0:
        raise ClusterError("the embedded node needs root (containerd, network namespaces, cgroups)")
    missing = sorted(
        {package for need, package in REQUIREMENTS.items() if not (shutil.which(need) or os.access(need, os.X_OK))}
    )
    if missing:
        raise ClusterError(f"the embedded node needs these Debian packages: apt-get install {' '.join(missing)}")
    if "overlay" not in Path("/proc/filesystems").read_text():
        raise ClusterError("the embedded node needs the kernel's overlay filesystem (modprobe overlay)")
    unified = Path("/sys/fs/cgroup/cgroup.controllers")
    if not _cgroup_mounts("memory") and not (unified.exists() and "memory" in unified.read_text().split()):
        raise ClusterError("the embedded node needs the memory cgroup controller (none is mounted)")


def _node_ready(kube: Kube, name: str) -> bool:
    node = kube.read_node(name)
    conditions = ((node or {}).get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def _allocatable(kube: Kube, name: str) -> dict:
    with contextlib.suppress(ApiException):
        return ((kube.read_node(name) or {}).get("status") or {}).get("allocatable") or {}
    return {}


def _shims_of(address: Path) -> list[int]:
    """The pids of containerd shims started for the containerd at address."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            argv = cmdline.read_bytes().split(b"\0")
            if argv and argv[0].endswith(b"containerd-shim-runc-v2") and str(address).encode() in argv:
                pids.append(int(cmdline.parent.name))
    return pids


def _mount_points() -> list[tuple[str, str, list[str]]]:
    """(mount point, filesystem type, superblock options) of every mount of this mount namespace."""
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        separator = fields.index("-")
        mounts.append((point, fields[separator + 1], fields[separator + 3].split(",")))
    return mounts


def _unmount_under(folder: Path) -> None:
    points = sorted({p for p, _, _ in _mount_points() if Path(p).is_relative_to(folder)}, key=len, reverse=True)
    for point in points:
        if subprocess.run(["umount", point], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", point], capture_output=True)


def _cgroup_mounts(controller: str | None = None) -> list[Path]:
    found = []
    for point, kind, options in _mount_points():
        if kind in ("cgroup", "cgroup2") and (controller is None or controller in options):
            found.append(Path(point))
    return found


def _remove_cgroups() -> None:
    """rmdir the `kubepods` and `k8s.io` cgroup trees, leaves first, in every hierarchy."""
    for hierarchy in _cgroup_mounts():
        for root in CGROUP_ROOTS:
            tree = hierarchy / root
            if tree.is_dir():
                for folder in sorted(
                    (p for p in tree.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
                ):
                    with contextlib.suppress(OSError):
                        folder.rmdir()
                with contextlib.suppress(OSError):
                    tree.rmdir()


def remove_folder(folder: Path) -> None:
    """Delete a stopped cluster's folder (or part of it), never through a mount still under it."""
    folder = Path(folder).absolute()
    mounted = [point for point, _, _ in _mount_points() if Path(point).is_relative_to(folder)]
    if mounted:
        raise ClusterError(f"not deleting {folder}: {mounted[0]} is still mounted (umount it first)")
    if folder.is_dir() and not folder.is_symlink():
        shutil.rmtree(folder)
    else:
        folder.unlink(missing_ok=True)


def leftovers(folder: Path) -> list[str]:
    """What of a stopped node still exists: mounts under its folder, network parts, cgroups."""
    found = [f"mount {p}" for p, _, _ in _mount_points() if Path(p).is_relative_to(Path(folder).absolute())]
    found += podnet.leftovers()
    found += [f"cgroup {h / r}" for h in _cgroup_mounts() for r in CGROUP_ROOTS if (h / r).is_dir()]
    return found


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
