"""Runs one pod on the local node, from its volumes to its deletion: init containers in order, then
all containers, each as a sandboxed local process (sandbox.py); restarts per restartPolicy with the
kubelet's back-off; SIGTERM then SIGKILL after the grace period when the pod is deleted; the pod's
status reported as a kubelet reports it (podstatus.py).

Files, under NODE/pods/<uid>/: the volumes, the pod's hosts file, and per container <name>.json (its
sandbox spec), <name>.root (where its root is built), <name>.pid, <name>.exit.json and
<name>.termination-log. The pid and exit files let a restarted agent adopt running containers instead
of starting them twice. Container output goes to NODE/logs/<namespace>/<pod>/<container>.log (the
previous run's in .log.1), see `pod_log_path`.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from kubernetes.client.rest import ApiException

import finetune_operator
import finetune_trainer
from finetune_dev.cluster import processes
from finetune_dev.cluster.containerenv import ContainerConfigError, container_env, expand
from finetune_dev.cluster.kubeapi import Kube
from finetune_dev.cluster.localnode import pod_log_path
from finetune_dev.cluster.network import PodNetwork
from finetune_dev.cluster.podstatus import ContainerRun, pod_phase, pod_status, waiting
from finetune_dev.cluster.volumes import LocalVolume, Mount, container_mounts, prepare_volumes

log = logging.getLogger(__name__)

HOST_IP = "127.0.0.1"
DEFAULT_GRACE_SECONDS = 30
CONFIG_RETRY_SECONDS = 2.0
BACKOFF_START_SECONDS = 10.0  # the kubelet's crash-loop back-off: 10 s, doubling, at most 5 minutes
BACKOFF_MAX_SECONDS = 300.0
MAX_TERMINATION_MESSAGE_BYTES = 4096
FALLBACK_LOG_LINES = 80
FALLBACK_LOG_BYTES = 2048
DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"
VANISHED_EXIT_CODE = 137


@dataclass(frozen=True)
class NodeContext:
    """What every pod worker of one node agent shares."""

    kube: Kube
    node_name: str
    node_dir: Path
    network: PodNetwork
    allocatable: dict[str, str]
    base_env: dict[str, str]  # PATH and friends, KUBERNETES_SERVICE_HOST/PORT


def _node_software() -> list[str]:
    """Where the node's own Python and packages live: the "image" every container runs from."""
    places = {sys.prefix, sys.base_prefix}
    places |= {str(Path(package.__file__).resolve().parent) for package in (finetune_operator, finetune_trainer)}
    return sorted(os.path.realpath(place) for place in places)


def _software_mounts_covered_by(mounts: list[Mount]) -> list[Mount]:
    """Re-expose the node's software where a volume covers it (a checkout under /tmp, an emptyDir at /tmp)."""
    targets = [os.path.realpath(mount.target) for mount in mounts]
    covered = [
        place
        for place in _node_software()
        if any(place == target or place.startswith(target.rstrip("/") + "/") for target in targets)
    ]
    return [Mount(place, place, read_only=True) for place in covered]


class PodWorker:
    def __init__(self, pod: dict, node: NodeContext):
        self.pod = pod
        self.node = node
        self.uid = pod["metadata"]["uid"]
        self.namespace = pod["metadata"]["namespace"]
        self.name = pod["metadata"]["name"]
        self.dir = node.node_dir / "pods" / self.uid
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pod_ip = node.network.assign(pod, self.dir / "hosts")
        status = pod.get("status") or {}
        self.start_time = status.get("startTime") or _now()
        init_containers = pod["spec"].get("initContainers") or []
        self.init_runs = _runs(init_containers, status.get("initContainerStatuses"), "ContainerCreating")
        self.runs = _runs(
            pod["spec"]["containers"],
            status.get("containerStatuses"),
            "PodInitializing" if init_containers else "ContainerCreating",
        )
        self.init_names = {container["name"] for container in init_containers}
        self.specs = {container["name"]: container for container in init_containers + pod["spec"]["containers"]}
        self.restart_policy = pod["spec"].get("restartPolicy", "Always")
        # Running containers: the sandbox's pid, which leads the container's process group.
        self.processes: dict[str, int] = {}
        self.restart_at: dict[str, float] = {}
        self.volumes: dict[str, LocalVolume] | None = None
        self.config_retry_at = 0.0
        self.config_error: str | None = None
        self.failure: tuple[str, str] | None = None
        self.stopping = False
        self.kill_at: float | None = None
        self.delete_when_stopped = False
        self.deadline_at = self._active_deadline()
        self.conditions = status.get("conditions") or []
        self.reported: dict | None = None
        self.inbox: queue.Queue = queue.Queue()
        self._deleted = False
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name=f"pod {self.namespace}/{self.name}", daemon=True)

    # Called from the agent's thread
    def start(self) -> None:
        self.thread.start()

    @property
    def finished(self) -> bool:
        return not self.thread.is_alive()

    def terminate(self, grace_seconds: int | None) -> bool:
        """The pod has a deletionTimestamp: stop it within the grace period, then delete it.
        False if the worker has finished already: then the caller deletes the pod."""
        with self._lock:
            if self.finished:
                return False
            self.inbox.put(("terminate", grace_seconds))
            return True

    def pod_deleted(self) -> None:
        """The pod object is gone (force-deleted, or deleted after it finished): stop and clean up."""
        with self._lock:
            self._deleted = True
            if self.finished:
                self._clean_up()
                return
        self.inbox.put(("deleted", None))

    # The worker's thread
    def _run(self) -> None:
        try:
            self._adopt_processes()
            while not self._done():
                self._advance()
                self._report()
                self._handle(self._next_message())
            self._report(final=True)
            if self.delete_when_stopped:
                self.node.kube.delete_pod_now(self.namespace, self.name, self.uid)
        except Exception:
            log.exception("pod %s/%s: the node agent failed running it", self.namespace, self.name)
        finally:
            with self._lock:
                self._delete_if_asked_while_finishing()
                if self._deleted:
                    self._clean_up()

    def _delete_if_asked_while_finishing(self) -> None:
        """A deletion that arrived after the last message was handled still gets its pod deleted."""
        while not self.delete_when_stopped and not self._deleted:
            try:
                kind, _ = self.inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "terminate":
                self.node.kube.delete_pod_now(self.namespace, self.name, self.uid)
                return

    def _done(self) -> bool:
        if self.stopping:
            return not self.processes
        if self.failure:
            return False  # stopping follows
        return pod_phase(self.restart_policy, self.init_runs, self.runs) in ("Succeeded", "Failed")

    def _advance(self) -> None:
        """Start what is due: volumes, the next init container, containers (re)starting."""
        if self.stopping:
            return
        if self.deadline_at is not None and time.monotonic() >= self.deadline_at:
            self.deadline_at = None
            self.failure = ("DeadlineExceeded", "Pod was active on the node longer than the specified deadline")
            self._stop(self._grace_seconds(), delete=False)
            return
        if self.volumes is None and not self._prepare_volumes():
            return
        pending_init = next((run for run in self.init_runs if not run.succeeded), None)
        if pending_init is not None:
            if pending_init.name not in self.processes and self._may_start(pending_init):
                self._start(pending_init)
            return
        for run in self.runs:
            if run.name not in self.processes and self._may_start(run):
                self._start(run)

    def _may_start(self, run: ContainerRun) -> bool:
        if run.name in self.restart_at:
            return time.monotonic() >= self.restart_at[run.name]
        return "waiting" in run.state and time.monotonic() >= self.config_retry_at

    def _prepare_volumes(self) -> bool:
        if time.monotonic() < self.config_retry_at:
            return False
        try:
            self.volumes = prepare_volumes(self._pod_as_seen(), self.dir, self.node.kube, self.node.allocatable)
        except (ContainerConfigError, ApiException, OSError) as error:
            self._config_error(self.init_runs + self.runs, "FailedMount", f"MountVolume.SetUp failed: {error}")
            return False
        return True

    def _config_error(self, runs: list[ContainerRun], event_reason: str, message: str) -> None:
        """Report why containers cannot start yet, and try again shortly, as a kubelet does."""
        for run in runs:
            if "waiting" in run.state:
                run.state = waiting("CreateContainerConfigError", message)
        self.config_retry_at = time.monotonic() + CONFIG_RETRY_SECONDS
        if message != self.config_error:  # one event per distinct problem, not one per retry
            self.config_error = message
            self._event(event_reason, message, warning=True)

    def _start(self, run: ContainerRun) -> None:
        try:
            spec = self._sandbox_spec(run.name)
        except (ContainerConfigError, ApiException) as error:
            self._config_error([run], "Failed", f"Error: {error}")
            return
        spec_file = self.dir / f"{run.name}.json"
        spec_file.write_text(json.dumps(spec, indent=1))
        self._exit_file(run.name).unlink(missing_ok=True)
        (self.dir / f"{run.name}.termination-log").write_bytes(b"")
        with self._rotated_log(run.name).open("ab") as output:
            sandbox = subprocess.Popen(
                [sys.executable, "-m", "finetune_dev.cluster.sandbox", str(spec_file)],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # the container's process group, signalled as a whole
            )
        processes.write_pid_file(self._pid_file(run.name), sandbox.pid)
        self.processes[run.name] = sandbox.pid
        self.config_error = None
        if run.name in self.restart_at:
            del self.restart_at[run.name]
            run.restart_count += 1
        run.state = {"running": {"startedAt": _now()}}
        threading.Thread(target=self._wait_for_child, args=(run.name, sandbox), daemon=True).start()
        self._event("Started", f"Started container {run.name}")

    def _sandbox_spec(self, name: str) -> dict:
        """What sandbox.py needs to run the container: command, env, mounts, hostname, files."""
        container = self.specs[name]
        base_env = {**self.node.base_env, "HOSTNAME": self._hostname()}
        kube = self.node.kube
        env = container_env(
            self._pod_as_seen(), container, base_env, kube.read_config_map, kube.read_secret, self.node.allocatable
        )
        termination_path = container.get("terminationMessagePath") or DEFAULT_TERMINATION_MESSAGE_PATH
        mounts = [
            *container_mounts(container, self.volumes or {}, env),
            Mount(str(self.dir / "hosts"), "/etc/hosts", read_only=False),
            Mount(str(self.dir / f"{name}.termination-log"), termination_path, read_only=False),
        ]
        mounts += _software_mounts_covered_by(mounts)
        # Parents before children: a mount inside another volume's mount point lands in that volume.
        mounts.sort(key=lambda mount: len(Path(mount.target).parts))
        return {
            "argv": [expand(arg, env) for arg in (container.get("command") or []) + (container.get("args") or [])],
            "env": env,
            "workingDir": container.get("workingDir") or "/",
            "hostname": self._hostname(),
            "root": str(self.dir / f"{name}.root"),
            "mounts": [{"source": m.source, "target": m.target, "readOnly": m.read_only} for m in mounts],
            "exitFile": str(self._exit_file(name)),
        }

    def _wait_for_child(self, name: str, sandbox: subprocess.Popen) -> None:
        sandbox.wait()
        self.inbox.put(("exited", (name, sandbox.pid)))

    def _wait_for_adopted(self, name: str, pid: int) -> None:
        while not processes.wait_for_exit(pid, timeout=3600):
            pass
        self.inbox.put(("exited", (name, pid)))

    def _adopt_processes(self) -> None:
        """After an agent restart: follow containers still running, learn how the others ended, and
        resume back-offs, from the pid and exit files and the status the earlier agent reported."""
        for run in self.init_runs + self.runs:
            pid = processes.running_pid(self._pid_file(run.name))
            if pid is not None:
                self.processes[run.name] = pid
                if not run.running:
                    run.state = {"running": {"startedAt": _now()}}
                threading.Thread(target=self._wait_for_adopted, args=(run.name, pid), daemon=True).start()
                log.info("pod %s/%s: adopted container %s (pid %d)", self.namespace, self.name, run.name, pid)
            elif run.running or self._unreported_exit(run):
                self._container_exited(run.name)
            elif run.state.get("waiting", {}).get("reason") == "CrashLoopBackOff":
                self.restart_at[run.name] = time.monotonic()
        if any("waiting" not in run.state for run in self.init_runs + self.runs):
            self._prepare_volumes()

    def _unreported_exit(self, run: ContainerRun) -> bool:
        record = self._read_exit_file(run.name)
        reported = [state.get("terminated", {}).get("finishedAt") for state in (run.state, run.last_state)]
        return record is not None and record["finishedAt"] not in reported

    def _next_message(self) -> tuple[str, object] | None:
        now = time.monotonic()
        wake_ups = [*self.restart_at.values(), self.kill_at, self.deadline_at]
        if not self.stopping and (self.volumes is None or self._config_errors()):
            wake_ups.append(self.config_retry_at)
        timeout = min((t - now for t in wake_ups if t is not None), default=None)
        try:
            return self.inbox.get(timeout=max(timeout, 0) if timeout is not None else None)
        except queue.Empty:
            return None

    def _config_errors(self) -> bool:
        return any(
            run.state.get("waiting", {}).get("reason") == "CreateContainerConfigError"
            for run in self.init_runs + self.runs
        )

    def _handle(self, message: tuple[str, object] | None) -> None:
        if message is None:
            if self.kill_at is not None and time.monotonic() >= self.kill_at:
                self.kill_at = None
                for pid in self.processes.values():
                    processes.signal_group(pid, signal.SIGKILL)
            return
        kind, value = message
        if kind == "exited":
            name, pid = value
            if self.processes.get(name) == pid:  # not a message about an earlier run
                self._container_exited(name)
        elif kind == "terminate":
            self._stop(value if value is not None else self._grace_seconds(), delete=True)
        elif kind == "deleted":
            self._stop(self._grace_seconds(), delete=False)

    def _stop(self, grace_seconds: int, *, delete: bool) -> None:
        self.delete_when_stopped = self.delete_when_stopped or delete
        kill_at = time.monotonic() + grace_seconds
        if self.stopping:  # a second deletion may only shorten the grace period
            self.kill_at = min(self.kill_at, kill_at) if self.kill_at is not None else None
            return
        self.stopping = True
        self.restart_at.clear()
        self.kill_at = kill_at
        for name, pid in self.processes.items():
            self._event("Killing", f"Stopping container {name}")
            processes.signal_group(pid, signal.SIGTERM if grace_seconds > 0 else signal.SIGKILL)

    def _container_exited(self, name: str) -> None:
        self.processes.pop(name, None)
        run = next(run for run in self.init_runs + self.runs if run.name == name)
        container = self.specs[name]
        started_at = run.state.get("running", {}).get("startedAt", self.start_time)
        record = self._exit_record(name)
        terminated = {
            "exitCode": record["exitCode"],
            "reason": record["reason"],
            "startedAt": started_at,
            "finishedAt": record["finishedAt"],
            "containerID": f"local://{self.uid}/{name}/{run.restart_count}",
        }
        message = record.get("message") or self._termination_message(name, container, record["exitCode"])
        if message:
            terminated["message"] = message
        run.state = {"terminated": terminated}
        exit_code = record["exitCode"]
        restart = not self.stopping and (
            (self.restart_policy == "Always" and name not in self.init_names)
            or (self.restart_policy != "Never" and exit_code != 0)
        )
        if restart:
            backoff = min(BACKOFF_START_SECONDS * 2**run.restart_count, BACKOFF_MAX_SECONDS)
            self.restart_at[name] = time.monotonic() + backoff
            run.last_state = run.state
            run.state = waiting(
                "CrashLoopBackOff", f"back-off {backoff:.0f}s restarting failed container={name} pod={self.name}"
            )
            self._event("BackOff", "Back-off restarting failed container", warning=True)

    def _exit_record(self, name: str) -> dict:
        """How the container ended, from the sandbox's exit file; a sandbox killed outright left none."""
        return self._read_exit_file(name) or {
            "exitCode": VANISHED_EXIT_CODE,
            "reason": "Error",
            "finishedAt": _now(),
            "message": None,
        }

    def _read_exit_file(self, name: str) -> dict | None:
        try:
            return json.loads(self._exit_file(name).read_text())
        except (OSError, ValueError):
            return None

    def _termination_message(self, name: str, container: dict, exit_code: int) -> str:
        path = self.dir / f"{name}.termination-log"
        try:
            with path.open("rb") as file:
                message = file.read(MAX_TERMINATION_MESSAGE_BYTES).decode(errors="replace")
        except OSError:
            message = ""
        if not message and exit_code != 0 and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            message = _log_tail(pod_log_path(self.node.node_dir, self.namespace, self.name, name))
        return message

    def _report(self, final: bool = False) -> None:
        status = pod_status(
            {**self.pod, "status": {**(self.pod.get("status") or {}), "conditions": self.conditions}},
            pod_ip=self.pod_ip,
            host_ip=HOST_IP,
            start_time=self.start_time,
            init_runs=self.init_runs,
            runs=self.runs,
            now=_now(),
            failure=self.failure,
        )
        if status == self.reported:
            return
        for attempt in range(3 if final else 1):
            try:
                self.node.kube.patch_pod_status(self.namespace, self.name, status)
            except ApiException as error:
                if error.status == 404:
                    return
                log.warning("pod %s/%s: status update failed: %s", self.namespace, self.name, error.reason)
                time.sleep(0.5 * (attempt + 1))
                continue
            self.reported = status
            self.conditions = status["conditions"]
            return

    def _event(self, reason: str, message: str, warning: bool = False) -> None:
        now = _now()
        self.node.kube.create_event(
            {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"generateName": f"{self.name}.", "namespace": self.namespace},
                "involvedObject": {
                    "kind": "Pod",
                    "apiVersion": "v1",
                    "namespace": self.namespace,
                    "name": self.name,
                    "uid": self.uid,
                },
                "reason": reason,
                "message": message,
                "type": "Warning" if warning else "Normal",
                "source": {"component": "kubelet", "host": self.node.node_name},
                "firstTimestamp": now,
                "lastTimestamp": now,
                "count": 1,
            }
        )

    def _pod_as_seen(self) -> dict:
        """The pod with the addresses the node gave it, for fieldRefs and the downward API."""
        status = {
            **(self.pod.get("status") or {}),
            "podIP": self.pod_ip,
            "podIPs": [{"ip": self.pod_ip}],
            "hostIP": HOST_IP,
        }
        return {**self.pod, "status": status}

    def _hostname(self) -> str:
        return self.pod["spec"].get("hostname") or self.name[:63]

    def _grace_seconds(self) -> int:
        grace = self.pod["spec"].get("terminationGracePeriodSeconds")
        return DEFAULT_GRACE_SECONDS if grace is None else grace

    def _active_deadline(self) -> float | None:
        seconds = self.pod["spec"].get("activeDeadlineSeconds")
        if seconds is None:
            return None
        started = datetime.datetime.fromisoformat(self.start_time.replace("Z", "+00:00"))
        elapsed = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
        return time.monotonic() + seconds - elapsed

    def _pid_file(self, name: str) -> Path:
        return self.dir / f"{name}.pid"

    def _exit_file(self, name: str) -> Path:
        return self.dir / f"{name}.exit.json"

    def _rotated_log(self, name: str) -> Path:
        path = pod_log_path(self.node.node_dir, self.namespace, self.name, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            path.replace(path.with_name(path.name + ".1"))
        return path

    def _clean_up(self) -> None:
        self.node.network.release(self.uid)
        shutil.rmtree(self.dir, ignore_errors=True)


def _runs(containers: list[dict], statuses: list[dict] | None, waiting_reason: str) -> list[ContainerRun]:
    """One ContainerRun per container, carrying over what an earlier agent reported."""
    by_name = {status["name"]: status for status in statuses or []}
    runs = []
    for container in containers:
        run = ContainerRun(container["name"], container.get("image", ""), state=waiting(waiting_reason))
        reported = by_name.get(container["name"])
        if reported:
            run.restart_count = reported.get("restartCount", 0)
            run.state = reported.get("state") or run.state
            run.last_state = reported.get("lastState") or {}
        runs.append(run)
    return runs


def _log_tail(path: Path) -> str:
    try:
        with path.open("rb") as file:
            file.seek(0, 2)
            size = file.tell()
            file.seek(max(0, size - FALLBACK_LOG_BYTES))
            tail = file.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(tail.splitlines()[-FALLBACK_LOG_LINES:])


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
