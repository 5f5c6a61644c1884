"""Shared pieces of the operator benchmarks (operator_scale.py, restart_latency.py, api_requests.py).

An embedded control plane with optional extra API server flags, the operator as a real process made
ready by a warm-up job, a pod watch that timestamps every pod the moment the API server announces it
(no poll-and-sleep), the operator's peak RSS, notes on the machine and its load, and the writer of a
benchmark's own `## ...` section of bench/RESULTS.md (other sections are left as they are).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import os
import platform
import re
import secrets
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes
import results
from kubernetes.client import ApiException
from kubernetes.watch.watch import iter_resp_lines

from finetune_dev.cluster.controlplane import ControlPlane
from finetune_dev.harness import GROUP, PLURAL, VERSION, Jobs, OperatorProcess, install_crd, job_manifest

REPO = Path(__file__).resolve().parents[1]
RESULTS = results.RESULTS
LABEL_JOB = "finetune.dev/job"
LABEL_ATTEMPT = "finetune.dev/attempt"
# The benchmark's own requests carry this User-Agent, so the audit log tells them from the operator's.
BENCH_USER_AGENT = "finetune-bench"
CLIENT_THREADS = 16


class BenchControlPlane(ControlPlane):
    """The embedded control plane, with extra kube-apiserver / kube-controller-manager flags."""

    def __init__(
        self, folder: Path, apiserver_flags: list[str] | None = None, controller_manager_flags: list[str] | None = None
    ) -> None:
        super().__init__(folder)
        self.extra_apiserver_flags = list(apiserver_flags or [])
        self.extra_controller_manager_flags = list(controller_manager_flags or [])

    def _apiserver_flags(self, ports: dict[str, int]) -> list[str]:
        return [*super()._apiserver_flags(ports), *self.extra_apiserver_flags]

    def _controller_manager_flags(self) -> list[str]:
        return [*super()._controller_manager_flags(), *self.extra_controller_manager_flags]


@contextlib.contextmanager
def cluster(
    folder: Path, apiserver_flags: list[str] | None = None, controller_manager_flags: list[str] | None = None
) -> Iterator[BenchControlPlane]:
    """A fresh control plane with the CRD installed; stopped (all four processes) on exit."""
    control_plane = BenchControlPlane(folder, apiserver_flags, controller_manager_flags)
    control_plane.start()
    try:
        install_crd(client(control_plane))
        yield control_plane
    finally:
        control_plane.stop()


def client(control_plane: ControlPlane, threads: int = CLIENT_THREADS) -> kubernetes.client.ApiClient:
    """A client of the benchmark itself (its own User-Agent), with a connection per thread."""
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=str(control_plane.kubeconfig), client_configuration=configuration)
    configuration.connection_pool_maxsize = threads
    api_client = kubernetes.client.ApiClient(configuration)
    api_client.user_agent = BENCH_USER_AGENT
    return api_client


def create_namespace(api_client: kubernetes.client.ApiClient, prefix: str) -> str:
    """A fresh namespace whose default ServiceAccount can run pods (before 1.24: once it has a token)."""
    core = kubernetes.client.CoreV1Api(api_client)
    name = f"{prefix}-{secrets.token_hex(3)}"
    core.create_namespace({"metadata": {"name": name}})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # a few ms after the namespace; not part of any measurement
        with contextlib.suppress(ApiException):
            if core.read_namespaced_service_account("default", name).secrets:
                return name
        time.sleep(0.05)
    raise RuntimeError(f"namespace {name}: the default ServiceAccount got no token within 30 s")


@contextlib.contextmanager
def operator(control_plane: ControlPlane, folder: Path, env: dict[str, str] | None = None) -> Iterator[OperatorProcess]:
    """The operator process (`python -m finetune_operator operator`), ready: its watches are up and it
    has made the pod of a one-worker warm-up job. Stopped (SIGTERM, then SIGKILL) on exit."""
    process = OperatorProcess(str(control_plane.kubeconfig), folder / "operator.log", env)
    process.start()
    try:
        api_client = client(control_plane)
        namespace = create_namespace(api_client, "warmup")
        with watch_pods(api_client, namespace) as pods:
            Jobs(api_client, namespace).create(job_manifest("warmup", workers=1))
            if not pods.wait(lambda seen: len(seen.live()) == 1, timeout=60):
                raise RuntimeError(f"the operator made no warm-up pod in 60 s; see {process.log_path}")
        yield process
    finally:
        process.stop()


@dataclass
class Seen:
    """One object as a watch saw it: when it was added (and deleted), and its latest state."""

    name: str
    uid: str
    labels: dict[str, str]
    added: float  # time.monotonic() when the watch announced it
    body: dict[str, Any]
    deleted: float | None = None


@dataclass
class Watch:
    """Objects of one list call (e.g. a namespace's pods), timestamped as the API server announces them.

    `list_call` is a client list method with its arguments bound (functools.partial); the watch lists,
    then follows from that resourceVersion. Events are parsed as plain JSON (not into client models), so
    thousands of pods cost the benchmark little CPU on a machine it shares with the operator and the
    API server.
    """

    list_call: Callable[..., Any]
    objects: dict[str, Seen] = field(default_factory=dict)  # by uid: names repeat across attempts
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _response: Any = None
    _thread: threading.Thread | None = None
    _error: BaseException | None = None

    def __enter__(self) -> Watch:
        body = json.loads(self.list_call(_preload_content=False).data)
        now = time.monotonic()
        for item in body["items"]:
            self._update("ADDED", item, now)
        self._response = self.list_call(
            watch=True,
            timeout_seconds=3600,
            _preload_content=False,
            resource_version=body["metadata"]["resourceVersion"],
        )
        self._thread = threading.Thread(target=self._follow, name="bench-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        with contextlib.suppress(Exception):
            self._response.shutdown()  # unblocks the reader (urllib3 >= 2.3)
        with contextlib.suppress(Exception):
            self._response.release_conn()
        if self._thread:
            self._thread.join(timeout=5)

    def _follow(self) -> None:
        try:
            for line in iter_resp_lines(self._response):
                now = time.monotonic()
                event = json.loads(line)
                with self._changed:
                    self._update(event["type"], event["object"], now)
                    self._changed.notify_all()
        except BaseException as error:
            self._error = error
            with self._changed:
                self._changed.notify_all()

    def _update(self, type_: str, obj: dict[str, Any], now: float) -> None:
        metadata = obj.get("metadata") or {}
        uid = metadata.get("uid")
        if uid is None:  # an ERROR or BOOKMARK event
            return
        seen = self.objects.setdefault(uid, Seen(metadata["name"], uid, metadata.get("labels") or {}, now, obj))
        seen.body = obj
        if type_ == "DELETED":
            seen.deleted = now

    def live(self, **labels: str) -> list[Seen]:
        """Objects not deleted (yet), optionally only those with these label values."""
        return [
            seen
            for seen in self.objects.values()
            if seen.deleted is None and all(seen.labels.get(k) == v for k, v in labels.items())
        ]

    def named(self, name: str) -> Seen | None:
        found = [seen for seen in self.objects.values() if seen.name == name and seen.deleted is None]
        return found[-1] if found else None

    def wait(self, ready: Callable[[Watch], Any], timeout: float) -> Any:
        """Block until ready(self) is truthy (re-checked on every event); its value, or None on timeout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                value = ready(self)
                left = deadline - time.monotonic()
                if value or left <= 0:
                    return value or None
                if self._error is not None:
                    raise RuntimeError(f"the watch ended: {self._error!r}")
                self._changed.wait(left)


def watch_pods(api_client: kubernetes.client.ApiClient, namespace: str, label_selector: str = LABEL_JOB) -> Watch:
    core = kubernetes.client.CoreV1Api(api_client)
    return Watch(functools.partial(core.list_namespaced_pod, namespace, label_selector=label_selector))


def watch_jobs(api_client: kubernetes.client.ApiClient, namespace: str) -> Watch:
    custom = kubernetes.client.CustomObjectsApi(api_client)
    return Watch(functools.partial(custom.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL))


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set size (VmHWM: exact, kept by the kernel), in MB."""
    return _proc_status_kb(pid, "VmHWM") / 1024


def rss_mb(pid: int) -> float:
    return _proc_status_kb(pid, "VmRSS") / 1024


def _proc_status_kb(pid: int, key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    if not match:
        raise RuntimeError(f"no {key} in /proc/{pid}/status")
    return int(match.group(1))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> str:
    cores = os.cpu_count()
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cpu = results.cpu_name()
    return (
        f"{cores} cores ({cpu}), {memory_gib:.0f} GiB, no GPU, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (p95 of 20 values is the 19th smallest)."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))]


def median(values: list[float]) -> float:
    return statistics.median(values)


def operator_metrics(process: OperatorProcess) -> dict[str, float]:
    """The operator's own Prometheus samples (unlabelled and summed over labels), by name."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{process.metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name_and_labels, value = line.rsplit(" ", 1)
        name = name_and_labels.split("{", 1)[0]
        samples[name] = samples.get(name, 0.0) + float(value)
    return samples


def scratch_folder(prefix: str) -> tempfile.TemporaryDirectory:
    # Cluster folders hold UNIX sockets and etcd data: keep them short-pathed and on local disk.
    return tempfile.TemporaryDirectory(prefix=f"ftbench-{prefix}-")


def git_revision() -> str:
    command = ["git", "-C", str(REPO), "describe", "--always", "--dirty"]
    result = subprocess.run(command, capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


def record_section(title: str, body: str, path: Path = RESULTS) -> None:
    results.record_section(f"## {title}\n\n{body.strip()}\n", path)


def recorded_header(date: str, load: str, script: str) -> str:
    """Where, when and how a figure was made: the opening lines of every operator benchmark's section."""
    command = shlex.join([f"bench/{script}", *sys.argv[1:]])
    return (
        f"Recorded {date} on {machine()}; load average {load} at the start, {load_average()} at the end (the 2 "
        f"cores are shared with other work); git {git_revision()} plus the working tree.\n\n"
        f"Command: `.venv/bin/python {command}`\n\n"
    )


AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: Metadata
"""


def audit_flags(folder: Path) -> list[str]:
    """kube-apiserver flags that log every request (Metadata level: who, verb, resource, code) to folder."""
    folder.mkdir(parents=True, exist_ok=True)
    policy = folder / "audit-policy.yaml"
    policy.write_text(AUDIT_POLICY)
    return [
        f"--audit-policy-file={policy}",
        f"--audit-log-path={folder / 'audit.log'}",
        "--audit-log-maxsize=0",
        "--audit-log-mode=blocking",
    ]


@dataclass(frozen=True)
class Request:
    """One API request from the audit log."""

    audit_id: str
    time: float  # requestReceivedTimestamp, seconds since the epoch
    user_agent: str
    verb: str
    resource: str  # resource[/subresource], e.g. pods, finetunejobs/status
    namespace: str
    name: str
    code: int | None

    @property
    def component(self) -> str:
        return self.user_agent.split("/", 1)[0].split(" ", 1)[0]


def read_audit(path: Path) -> list[Request]:
    """Requests in the audit log, one per audit ID (a watch logs ResponseStarted and ResponseComplete)."""
    requests: dict[str, Request] = {}
    for line in path.read_text().splitlines():
        event = json.loads(line)
        if event["auditID"] in requests:
            continue
        ref = event.get("objectRef") or {}
        resource = ref.get("resource", event["requestURI"].split("?")[0])
        if ref.get("subresource"):
            resource += "/" + ref["subresource"]
        stamp = datetime.datetime.fromisoformat(event["requestReceivedTimestamp"].replace("Z", "+00:00"))
        requests[event["auditID"]] = Request(
            audit_id=event["auditID"],
            time=stamp.timestamp(),
            user_agent=event.get("userAgent", ""),
            verb=event["verb"],
            resource=resource,
            namespace=ref.get("namespace", ""),
            name=ref.get("name", ""),
            code=(event.get("responseStatus") or {}).get("code"),
        )
    return sorted(requests.values(), key=lambda r: r.time)
