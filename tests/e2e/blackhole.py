"""A TCP proxy on loopback that can stop forwarding: a network partition between the operator and its API
server, for the chaos tests. While blackholed it holds what either side sends and answers nothing (new
connections are accepted and left waiting), as dropped packets would; restored, it forwards again, what it
held included, as TCP's retransmissions would deliver it."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import yaml

CHUNK = 2**16


class BlackholeProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._forwarding = threading.Event()
        self._forwarding.set()
        self._sockets: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, name="blackhole-accept", daemon=True).start()

    def blackhole(self) -> None:
        self._forwarding.clear()

    def restore(self) -> None:
        self._forwarding.set()

    def close(self) -> None:
        self._closed = True
        self._forwarding.set()
        self.listener.close()
        for sock in list(self._sockets):
            sock.close()

    def kubeconfig(self, original: str, path: Path) -> str:
        """A copy of the kubeconfig `original` whose clusters go through this proxy (the same TLS: the server's
        certificate names 127.0.0.1, which the proxy listens on too)."""
        config = yaml.safe_load(Path(original).read_text())
        for cluster in config["clusters"]:
            cluster["cluster"]["server"] = f"https://127.0.0.1:{self.port}"
        path.write_text(yaml.safe_dump(config))
        return str(path)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self._sockets.append(client)
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        self._forwarding.wait()  # a connection made during the partition reaches the server only after it
        try:
            upstream = socket.create_connection(self.target)
        except OSError:
            client.close()
            return
        self._sockets.append(upstream)
        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(CHUNK):
                self._forwarding.wait()
                sink.sendall(chunk)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            for sock in (source, sink):
                sock.close()
