"""What the embedded node runs beside the kubelet, in one process:

- the pods' way to the API server: a TCP forwarder whose listening socket lives in the DNS namespace on
  the `kubernetes` Service address (10.0.0.1:443), and which dials the API server on 127.0.0.1 (TLS
  passes through; the serving certificate covers 10.0.0.1 and kubernetes.default.svc);
- cluster DNS's data: a watch of the node's pods keeps dnsmasq's hosts file current (SIGHUP reloads it);
- the local-path provisioner (provisioner.py), binding claims to folders under the node's folder.

    python -m finetune_dev.cluster.nodeservices --kubeconfig KUBECONFIG --dir NODE_DIR --node NAME \
        --dnsmasq-pid-file FILE
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from finetune_dev.cluster import processes
from finetune_dev.cluster.kubeapi import Kube
from finetune_dev.cluster.pki import KUBERNETES_SERVICE_IP
from finetune_dev.cluster.podnet import DNS_NETNS, hosts_lines
from finetune_dev.cluster.provisioner import LocalPathProvisioner

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
API_SERVICE_PORT = 443
READY_MARKER = "services.ready"


def listen_in_netns(netns: str, address: tuple[str, int]) -> socket.socket:
    """A listening TCP socket inside the named network namespace; the calling thread returns to its own."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/thread-self/ns/net") as home, open(f"/run/netns/{netns}") as target:
        if libc.setns(target.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {netns}")
        try:
            server = socket.create_server(address, backlog=64)
        finally:
            if libc.setns(home.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    return server


def forward(server: socket.socket, upstream: tuple[str, int], stop: threading.Event) -> None:
    """Accept on server, connect each client to upstream, and copy bytes both ways."""
    server.settimeout(1.0)
    while not stop.is_set():
        try:
            client, _ = server.accept()
        except TimeoutError:
            continue
        try:
            target = socket.create_connection(upstream, timeout=5)
        except OSError as error:
            log.warning("forwarder: cannot reach %s:%d: %s", *upstream, error)
            client.close()
            continue
        target.settimeout(None)
        for source, sink in ((client, target), (target, client)):
            threading.Thread(target=_pump, args=(source, sink), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            source.shutdown(socket.SHUT_RD)


class HostsFile:
    """dnsmasq's hosts file, written from the pods seen by a watch; SIGHUP makes dnsmasq reread it."""

    def __init__(self, path: Path, dnsmasq_pid_file: Path):
        self.path = path
        self.dnsmasq_pid_file = dnsmasq_pid_file
        self.pods: dict[str, dict] = {}
        self.written: list[str] | None = None

    def on_pod(self, event_type: str, pod: dict) -> None:
        uid = pod["metadata"]["uid"]
        if event_type == "DELETED":
            self.pods.pop(uid, None)
        else:
            self.pods[uid] = pod
        lines = hosts_lines(list(self.pods.values()))
        if lines != self.written:
            partial = self.path.with_name(self.path.name + ".partial")
            partial.write_text("\n".join(lines) + "\n")
            partial.replace(self.path)
            self.written = lines
            pid = processes.running_pid(self.dnsmasq_pid_file)
            if pid is not None:
                os.kill(pid, signal.SIGHUP)


def _in_thread(name: str, target: Callable[[threading.Event], None], stop: threading.Event) -> None:
    """Run target(stop) in a daemon thread; if it fails, the whole process stops (cluster up sees it)."""

    def guarded() -> None:
        try:
            target(stop)
        except Exception:
            log.exception("%s failed; stopping", name)
            stop.set()

    threading.Thread(target=guarded, name=name, daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune_dev.cluster.nodeservices")
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--dir", type=Path, required=True, help="the node's folder")
    parser.add_argument("--node", required=True, help="the Node's name")
    parser.add_argument("--dnsmasq-pid-file", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    kube = Kube(args.kubeconfig)
    host, _, port = kube.server.removeprefix("https://").partition(":")
    server = listen_in_netns(DNS_NETNS, (KUBERNETES_SERVICE_IP, API_SERVICE_PORT))
    hosts = HostsFile(args.dir / "dns" / "hosts", args.dnsmasq_pid_file)
    _in_thread("forwarder", lambda stop: forward(server, (host, int(port or 443)), stop), stop)
    _in_thread("dns", lambda stop: kube.watch_pods_on_node(args.node, hosts.on_pod, stop), stop)
    _in_thread("provisioner", LocalPathProvisioner(kube, args.dir).run, stop)
    (args.dir / READY_MARKER).write_text(f"{os.getpid()}\n")
    log.info(
        "forwarding %s:%d to %s; DNS hosts in %s", KUBERNETES_SERVICE_IP, API_SERVICE_PORT, kube.server, hosts.path
    )
    stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
