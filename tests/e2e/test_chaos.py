"""The operator under control-plane faults, for real (issue 23): the embedded API server and etcd, the real
node training the tiny model, the operator as a process. Each fault strikes once the job has its first
checkpoint, and each case ends with the job Succeeded, one gang (no pod made twice), no restart and no
step lost: the API server stopped for 30 s; etcd restarted; the operator's connection blackholed for 60 s;
two replicas with leader election, the leader's clock 16 s slow; the leader stopped (SIGTERM) for a rolling
update, as two processes and as the chart's Deployment rolled by `helm upgrade` on the node (the operator
image, its own ServiceAccount and RBAC). The operator SIGKILLed during gang creation is test_training's
test_operator_killed_mid_job_duplicates_no_pod.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import kubernetes
import psutil
import pytest
from kubernetes.client.rest import ApiException

from finetune_dev.cluster import processes
from finetune_dev.cluster.build import ensure_binaries, find_etcd
from finetune_dev.cluster.controlplane import ControlPlane
from finetune_dev.harness import OperatorProcess, kubectl, kubectl_binary, wait_for
from finetune_operator.handlers import SHUTDOWN_SECONDS
from tests.conftest import namespace_name
from tests.e2e.blackhole import BlackholeProxy
from tests.e2e.conftest import POD_DEFAULTS
from tests.e2e.test_training import PodRecorder, finish, first_checkpoint, run_job, training_process
from tests.e2e.tiny_jobs import GRACE_SECONDS, JOB, TOTAL_STEPS, WORKERS, cluster_spec, metrics
from tests.helm.chart import RELEASE, install_chart, uninstall_chart

pytestmark = pytest.mark.e2e

API_SERVER_DOWN_SECONDS = 30  # the faults' lengths, as the issue sets them: not synchronisation
BLACKHOLE_SECONDS = 60
CLOCK_SKEW_SECONDS = -16  # the leader's wall clock this far behind: a standby judging renewTime took over
HANDOVER_SECONDS = 10  # a released lease is taken at the standby's next attempt (retry period 2 s)
CHART_LEASE = "finetune-operator"
CHART_OPERATOR = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=operator"
ROLLED = "chaos.finetune.dev/rolled"  # a pod annotation the upgrade adds: a new pod template, so the Deployment rolls
CHART_POD_SECONDS = 120  # an operator pod scheduled, started and Ready (its readiness probe: 5 s, then every 10 s)


@contextmanager
def one_gang(kube, jobs, node, output: Path) -> Iterator[None]:
    """Around a run: on leaving, the job Succeeded with one gang, no restart and no step lost."""
    with PodRecorder(kube, jobs.namespace) as recorder:
        yield
        status = finish(jobs, node, "Succeeded")
    assert (status["restarts"], status.get("stepsLost", 0)) == (0, 0), status
    assert recorder.uids.keys() == {"0"} and len(recorder.uids["0"]) == WORKERS, recorder.uids
    assert metrics(output)["global_step"] == TOTAL_STEPS


def restart_process(control_plane: ControlPlane, name: str, down_seconds: float) -> None:
    """Stop one of the control plane's processes, keep it down, start it again with its own flags."""
    bin_dir = ensure_binaries()
    ports = control_plane._ports()
    argv = {
        "kube-apiserver": lambda: [bin_dir / "kube-apiserver", *control_plane._apiserver_flags(ports)],
        "etcd": lambda: [find_etcd(bin_dir), *control_plane._etcd_flags(ports)],
    }[name]()
    processes.stop(control_plane._pid_path(name))
    time.sleep(down_seconds)  # the outage itself
    control_plane._start(name, argv)
    wait_for(control_plane._apiserver_ready, 60, what=f"the API server to serve again after {name} restarted")
    controllers_working(control_plane)


def controllers_working(control_plane: ControlPlane) -> None:
    """Wait until the controller-manager acts again (its controllers back off while the API server is away):
    a new namespace's default ServiceAccount gets its token, as the next test's namespace needs."""
    core = kubernetes.client.CoreV1Api(kubernetes.config.new_client_from_config(str(control_plane.kubeconfig)))
    probe = namespace_name("chaos-probe")
    core.create_namespace({"metadata": {"name": probe}})
    try:

        def token() -> bool:
            try:
                return bool(core.read_namespaced_service_account("default", probe).secrets)
            except ApiException:
                return False

        wait_for(token, 180, interval=1, what="the controller-manager to give a new namespace its token")
    finally:
        core.delete_namespace(probe)


@pytest.fixture
def replicas(kube, operator, tmp_path) -> Iterator[list[OperatorProcess]]:
    """Operator processes a test starts instead of the package's one, which is stopped meanwhile."""
    started: list[OperatorProcess] = []
    operator.stop()
    try:
        yield started
    finally:
        for replica in started:
            replica.stop()
        operator.start()


def replica(replicas, operator, tmp_path, name: str, kubeconfig: str, **env: str) -> OperatorProcess:
    process = OperatorProcess(kubeconfig, tmp_path / f"{name}.log", {**operator.extra_env, **env})
    process.start()
    replicas.append(process)
    return process


def elected(namespace: str, identity: str, **env: str) -> dict[str, str]:
    return {
        "FINETUNE_OPERATOR_LEADER_ELECTION_LEASE": "finetune-operator",
        "FINETUNE_OPERATOR_LEADER_ELECTION_NAMESPACE": namespace,
        "POD_ID": identity,
        **env,
    }


def test_the_api_server_stopped_for_30s_mid_training(kube, jobs, runs, operator, node, tiny_assets):
    with one_gang(kube, jobs, node, runs / JOB):
        run_job(jobs, cluster_spec(tiny_assets))
        first_checkpoint(runs / JOB)
        restart_process(kube.control_plane, "kube-apiserver", API_SERVER_DOWN_SECONDS)


def test_etcd_restarted_mid_training(kube, jobs, runs, operator, node, tiny_assets):
    with one_gang(kube, jobs, node, runs / JOB):
        run_job(jobs, cluster_spec(tiny_assets))
        first_checkpoint(runs / JOB)
        restart_process(kube.control_plane, "etcd", 2)


def test_the_operators_connection_blackholed_for_60s(kube, jobs, runs, operator, replicas, node, tiny_assets, tmp_path):
    host, port = kube.control_plane.server.removeprefix("https://").split(":")
    proxy = BlackholeProxy(host, int(port))
    try:
        through_proxy = proxy.kubeconfig(kube.kubeconfig, tmp_path / "kubeconfig")
        replica(replicas, operator, tmp_path, "operator", through_proxy)
        with one_gang(kube, jobs, node, runs / JOB):
            run_job(jobs, cluster_spec(tiny_assets))
            first_checkpoint(runs / JOB)
            proxy.blackhole()
            time.sleep(BLACKHOLE_SECONDS)  # the partition itself
            proxy.restore()
    finally:
        proxy.close()


def test_two_replicas_and_the_leaders_clock_16s_slow(kube, jobs, runs, operator, replicas, node, tiny_assets, tmp_path):
    skewed = elected(jobs.namespace, "a", FINETUNE_FAULT_INJECTION_CLOCK_SKEW_SECONDS=str(CLOCK_SKEW_SECONDS))
    leader = replica(replicas, operator, tmp_path, "a", kube.kubeconfig, **skewed)
    wait_for(lambda: "leading: acquired" in leader.log(), 60, what="replica a to lead")
    standby = replica(replicas, operator, tmp_path, "b", kube.kubeconfig, **elected(jobs.namespace, "b"))
    wait_for(lambda: "waiting to lead" in standby.log(), 60, what="replica b to stand by")
    with one_gang(kube, jobs, node, runs / JOB):
        run_job(jobs, cluster_spec(tiny_assets))
    assert "leading: acquired" not in standby.log()  # never two leaders
    assert leader.process.poll() is None, leader.log()[-2000:]


def test_a_rolling_update_hands_the_lease_over_mid_training(
    kube, jobs, runs, operator, replicas, node, tiny_assets, tmp_path
):
    old = replica(replicas, operator, tmp_path, "old", kube.kubeconfig, **elected(jobs.namespace, "old"))
    wait_for(lambda: "leading: acquired" in old.log(), 60, what="the old replica to lead")
    new = replica(replicas, operator, tmp_path, "new", kube.kubeconfig, **elected(jobs.namespace, "new"))
    wait_for(lambda: "waiting to lead" in new.log(), 60, what="the new replica to stand by")
    with one_gang(kube, jobs, node, runs / JOB):
        run_job(jobs, cluster_spec(tiny_assets))
        first_checkpoint(runs / JOB)
        stopped = time.monotonic()
        old.stop()  # SIGTERM, as a rolling update sends: it finishes its work and releases the lease
        assert old.process.returncode == 0, old.log()[-2000:]
        wait_for(lambda: "leading: acquired" in new.log(), 60, what="the new replica to lead")
        assert time.monotonic() - stopped < SHUTDOWN_SECONDS + HANDOVER_SECONDS  # released, not left to expire
    assert "released lease" in old.log()


def chart_values(namespace: str) -> dict[str, Any]:
    """The chart set up as the package's operator process is (conftest.py's `operator`): the images the node
    imported (finetune_dev.images tags them with the chart's defaults), never pulled; this namespace only; one
    replica with leader election, so that an upgrade rolls: the new pod stands by while the old one leads."""
    return {
        "crds": {"enabled": False},  # the package's `crd` fixture installed it
        "image": {"pullPolicy": "Never"},
        "watchNamespaces": [namespace],
        "leaderElection": {"enabled": True, "leaseName": CHART_LEASE},
        "trainer": {
            "image": {"pullPolicy": "Never"},
            "terminationGracePeriodSeconds": GRACE_SECONDS,
            "resources": {"cpuPerGpu": "", "memoryPerGpu": ""},
            "podDefaults": POD_DEFAULTS,
        },
    }


class ChartOperator:
    """The chart's release in one namespace (release and jobs alike): its operator pods and the Lease they share."""

    def __init__(self, kube, namespace: str) -> None:
        self.kube, self.namespace = kube, namespace
        client = kube.api_client()
        self.core, self.coordination = kubernetes.client.CoreV1Api(client), kubernetes.client.CoordinationV1Api(client)

    def install(self, values: dict[str, Any]) -> None:
        """`helm upgrade --install` with these values alone."""
        install_chart(self.kube.kubeconfig, self.namespace, values)

    def leader(self) -> str:
        """The Lease's holderIdentity, the leading pod's name; empty while nobody holds it."""
        try:
            return self.coordination.read_namespaced_lease(CHART_LEASE, self.namespace).spec.holder_identity or ""
        except ApiException as error:
            if error.status == 404:
                return ""
            raise

    def pods(self) -> list[Any]:
        return self.core.list_namespaced_pod(self.namespace, label_selector=CHART_OPERATOR).items

    def pod(self, name: str) -> Any:
        try:
            return self.core.read_namespaced_pod(name, self.namespace)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def stopping(self, name: str) -> bool:
        pod = self.pod(name)
        return pod is None or pod.metadata.deletion_timestamp is not None

    def log(self, name: str) -> str:
        return kubectl("logs", "-n", self.namespace, name, kubeconfig=self.kube.kubeconfig).stdout


@contextmanager
def chart_operator(kube, namespace: str, values: dict[str, Any]) -> Iterator[ChartOperator]:
    """The chart installed with `values`; uninstalled on leaving, its operator pods gone."""
    chart = ChartOperator(kube, namespace)
    chart.install(values)
    try:
        yield chart
    finally:
        uninstall_chart(kube.kubeconfig, namespace)
        wait_for(lambda: not chart.pods(), CHART_POD_SECONDS, what="the chart's operator pods to go")


@contextmanager
def following_log(kube, namespace: str, pod: str, path: Path) -> Iterator[None]:
    """`kubectl logs --follow` of a pod into `path`, from now until its container ends (a deleted pod's log
    goes with it)."""
    cache = Path(kube.kubeconfig).parent / "kubectl-cache"
    command = [kubectl_binary(), f"--cache-dir={cache}", "logs", "--follow", "-n", namespace, pod]
    with path.open("w") as out:
        follower = subprocess.Popen(command, env=kube.env, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield
            follower.wait(timeout=30)  # the container has ended: the stream ends with it
        finally:
            if follower.poll() is None:
                follower.kill()
                follower.wait()


@contextmanager
def paused(processes: list[psutil.Process]) -> Iterator[None]:
    """SIGSTOP the processes, SIGCONT them on leaving."""
    for process in processes:
        process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        for process in processes:
            process.send_signal(signal.SIGCONT)


def test_helm_upgrade_rolls_the_charts_operator_mid_training(kube, jobs, runs, replicas, node, tiny_assets, tmp_path):
    values = chart_values(jobs.namespace)
    with chart_operator(kube, jobs.namespace, values) as chart:
        old = wait_for(chart.leader, CHART_POD_SECONDS, what="the chart's operator pod to lead")
        old_log = tmp_path / "old.log"
        with one_gang(kube, jobs, node, runs / JOB), following_log(kube, jobs.namespace, old, old_log):
            run_job(jobs, cluster_spec(tiny_assets))
            first_checkpoint(runs / JOB)
            # The tiny job would finish within the ~15 s a Deployment takes to roll: its training processes are
            # held (SIGSTOP) until the new pod leads, so the hand-over is mid-training on any machine. A pause
            # that short trips neither the progress deadline nor the collective timeout.
            with paused([training_process(node, pod) for pod in jobs.pods(JOB)]):
                upgraded = time.monotonic()
                chart.install(values | {"podAnnotations": {ROLLED: "true"}})
                # maxSurge 1, maxUnavailable 0: the old pod is stopped (SIGTERM) once the new one is Ready.
                wait_for(lambda: chart.stopping(old), CHART_POD_SECONDS, what=f"the Deployment to stop {old}")
                stopped = time.monotonic()
                new = wait_for(lambda: chart.leader() not in ("", old) and chart.leader(), 60, what="a new leader")
                led = time.monotonic()
                status = jobs.status(JOB)
            wait_for(lambda: chart.pod(old) is None, 60, what=f"{old} to go")
        print(
            f"helm upgrade -> {old} stopped: {stopped - upgraded:.1f} s; -> {new} leading: {led - stopped:.1f} s "
            f"(from the upgrade: {led - upgraded:.1f} s; the job {status.get('phase')} then, at step "
            f"{status.get('progress', {}).get('step')} of {TOTAL_STEPS})"
        )
        assert status.get("phase") == "Running", status
        assert chart.pod(new).metadata.annotations.get(ROLLED) == "true"  # the new ReplicaSet's pod
        assert "waiting to lead" in chart.log(new)  # it stood by while the old pod led: a rolling update
    assert "released lease" in old_log.read_text(), old_log.read_text()[-2000:]  # released, not left to expire
    assert led - stopped < SHUTDOWN_SECONDS + HANDOVER_SECONDS
