"""Starts and stops the node agent (node.py) as a background process, and on stop also the pods it
left running (an agent that stops leaves its pods, as a kubelet does; a cluster that stops must not)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from finetune_dev.cluster import processes
from finetune_dev.cluster.errors import ClusterError

READY_MARKER = "agent.ready"  # written by the agent once its Node is registered
START_TIMEOUT_SECONDS = 60.0
POD_GRACE_SECONDS = 5.0


def pod_log_path(node_dir: Path, namespace: str, pod: str, container: str) -> Path:
    """The log file of a container's current (or last) run on the local node; `kubectl logs` needs a
    kubelet API this node does not serve, so read this file instead."""
    return Path(node_dir) / "logs" / namespace / pod / f"{container}.log"


class LocalNode:
    """The node agent for one cluster, its files in `folder` (pods, volumes, logs, agent.log)."""

    def __init__(
        self, folder: Path, kubeconfig: Path, *, detach: bool = False, name: str = "local-node", gpus: int = 8
    ):
        self.folder = Path(folder).absolute()
        self.kubeconfig = Path(kubeconfig).absolute()
        self.detach = detach
        self.name = name
        self.gpus = gpus
        self._process: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        return self.folder / "agent.log"

    @property
    def pid_path(self) -> Path:
        return self.folder / "agent.pid"

    def is_running(self) -> bool:
        return processes.running_pid(self.pid_path) is not None

    def start(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Start the agent and return once it has registered its Node."""
        marker = self.folder / READY_MARKER
        marker.unlink(missing_ok=True)
        argv = [
            sys.executable,
            "-m",
            "finetune_dev.cluster.node",
            "--kubeconfig",
            self.kubeconfig,
            "--dir",
            self.folder,
            "--name",
            self.name,
            "--gpus",
            str(self.gpus),
        ]
        self._process = processes.start(
            argv, log_path=self.log_path, pid_path=self.pid_path, die_with_parent=not self.detach
        )
        deadline = time.monotonic() + timeout
        while not marker.exists():
            if self._process.poll() is not None:
                raise ClusterError(f"the node agent exited (code {self._process.returncode}):\n{self._log_tail()}")
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"the node agent did not register its Node within {timeout:.0f} s; see {self.log_path}"
                )
            time.sleep(0.1)

    def pod_log_path(self, namespace: str, pod: str, container: str) -> Path:
        return pod_log_path(self.folder, namespace, pod, container)

    def stop_agent(self) -> None:
        """Stop the agent only: its pods keep running, and an agent started again adopts them."""
        processes.stop(self.pid_path)
        if self._process is not None:
            self._process.wait()
            self._process = None

    def stop(self) -> None:
        """Stop the agent, then every pod process it started."""
        self.stop_agent()
        for pid_file in (self.folder / "pods").glob("*/*.pid"):
            processes.stop(pid_file, grace_seconds=POD_GRACE_SECONDS)

    def _log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
