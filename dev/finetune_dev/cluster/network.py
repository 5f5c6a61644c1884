"""Pod networking on the local node: each pod gets its own loopback address (127.1.x.y) as its pod IP,
and its own /etc/hosts (bind-mounted over the real one inside the pod, as a kubelet manages a per-pod
hosts file) that names every pod with a hostname and subdomain, as cluster DNS would:

    <hostname>.<subdomain>.<namespace>.svc.cluster.local, <hostname>.<subdomain>.<namespace>.svc,
    and <hostname>.<subdomain> for pods of the same namespace.

Pods share the host's ports (as with hostNetwork): two pods listening on one port clash, so only one
DDP gang at a time can use MASTER_PORT 29500.
"""

from __future__ import annotations

import ipaddress
import os
import threading
from dataclasses import dataclass
from pathlib import Path

FIRST_POD_IP = ipaddress.IPv4Address("127.1.0.1")
LAST_POD_IP = ipaddress.IPv4Address("127.1.255.254")
HOSTS_HEADER = "# Kubernetes-managed hosts file (finetune local node): pods of this node.\n"


@dataclass(frozen=True)
class PodAddress:
    """What the hosts files need to know about one pod."""

    ip: str
    namespace: str
    hostname: str  # spec.hostname, else the pod's name
    subdomain: str | None


def pod_address(pod: dict, ip: str) -> PodAddress:
    spec = pod.get("spec") or {}
    return PodAddress(
        ip=ip,
        namespace=pod["metadata"]["namespace"],
        hostname=spec.get("hostname") or pod["metadata"]["name"][:63],
        subdomain=spec.get("subdomain") or None,
    )


def render_hosts(base: str, own: PodAddress, pods: list[PodAddress]) -> str:
    """The /etc/hosts content for the pod `own`, given the host's hosts file and all pods of the node."""
    lines = [HOSTS_HEADER, base if base.endswith("\n") else base + "\n", "# pods\n"]
    for pod in pods:
        names = []
        if pod.subdomain:
            fqdn = f"{pod.hostname}.{pod.subdomain}.{pod.namespace}.svc"
            names = [f"{fqdn}.cluster.local", fqdn]
            if pod.namespace == own.namespace:
                names.append(f"{pod.hostname}.{pod.subdomain}")
        if pod == own:
            names.append(pod.hostname)
        if names:
            lines.append(f"{pod.ip}\t{' '.join(names)}\n")
    return "".join(lines)


class PodNetwork:
    """Hands out pod IPs and rewrites every running pod's hosts file when pods come and go."""

    def __init__(self, base_hosts: str):
        self._base_hosts = base_hosts
        self._lock = threading.Lock()
        self._addresses: dict[str, PodAddress] = {}  # by pod uid
        self._hosts_files: dict[str, Path] = {}

    def assign(self, pod: dict, hosts_file: Path) -> str:
        """The pod's IP (the one in its status if it already has one, e.g. after an agent restart)."""
        uid = pod["metadata"]["uid"]
        with self._lock:
            if uid not in self._addresses:
                ip = (pod.get("status") or {}).get("podIP")
                if not ip or ip in self._used_ips():
                    ip = self._free_ip()
                self._addresses[uid] = pod_address(pod, ip)
                self._hosts_files[uid] = hosts_file
            self._write_all()
            return self._addresses[uid].ip

    def release(self, uid: str) -> None:
        with self._lock:
            self._addresses.pop(uid, None)
            self._hosts_files.pop(uid, None)
            self._write_all()

    def _used_ips(self) -> set[str]:
        return {address.ip for address in self._addresses.values()}

    def _free_ip(self) -> str:
        used = self._used_ips()
        candidate = FIRST_POD_IP
        while str(candidate) in used or str(candidate).endswith((".0", ".255")):
            candidate += 1
            if candidate > LAST_POD_IP:
                raise RuntimeError("no free pod IP left in 127.1.0.0/16")
        return str(candidate)

    def _write_all(self) -> None:
        pods = sorted(self._addresses.values(), key=lambda address: address.ip)
        for uid, hosts_file in self._hosts_files.items():
            rewrite_in_place(hosts_file, render_hosts(self._base_hosts, self._addresses[uid], pods))


def rewrite_in_place(path: Path, content: str) -> None:
    """Overwrite path's bytes without replacing its inode.

    Running pods see the file through a bind mount of that inode, so a rename would leave them with
    the old content. One pwrite and no truncate: a shorter content is padded with a comment line, so
    a concurrent reader never sees a half-truncated file.
    """
    data = content.encode()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        old_size = os.fstat(fd).st_size
        if len(data) < old_size:
            padding = old_size - len(data)
            data += b"#" + b" " * (padding - 2) + b"\n" if padding >= 2 else b"\n"
        os.pwrite(fd, data, 0)
    finally:
        os.close(fd)
