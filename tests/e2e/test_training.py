"""The whole path for real: the operator process, the embedded cluster's real node, and workers that
run the trainer image and train the tiny model, surviving what production throws at them. Each case
asserts the final phase, the restart count, and the adapter or the message.

Each job takes seconds: 2 workers, 24 steps, a checkpoint every 4, no backoff. A worker's trainer is
found through containerd: the host pid of its container's first process (the trainer, or its child
under an init).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import threading
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes
import psutil
import pytest
import urllib3
from kubernetes.client.rest import ApiException

from finetune_dev.cluster.node import Node
from finetune_dev.harness import Jobs, kubectl, wait_for
from finetune_operator.builders import LABEL_ATTEMPT, LABEL_JOB, OUTPUT_MOUNT_PATH, TRAINER_CONTAINER, WORKER_UID
from tests.conftest import namespace_name
from tests.e2e.conftest import create_runs_claim
from tests.e2e.tiny_jobs import (
    ADAPTER_WEIGHTS,
    CHECKPOINT_INTERVAL,
    JOB,
    TOTAL_STEPS,
    WORKERS,
    adapter_difference,
    checkpoint_steps,
    cluster_spec,
    ddp_results,
    ddp_spec,
    manifest,
    metrics,
)

pytestmark = pytest.mark.e2e

RUN_SECONDS = 240  # one tiny run with a restart, on 2 busy cores; typical: 20-40 s
FAIL_SECONDS = 90  # a job that fails without training
EXACT = 1e-6  # fp32 on CPU: a resumed run gives the uninterrupted run's adapter to this


@dataclass(frozen=True)
class Run:
    namespace: str
    status: dict[str, Any]
    output: Path  # the job's folder in the claim `runs`, on this machine


# --- helpers -------------------------------------------------------------------------------------------


@contextmanager
def fresh_namespace(kube, label: str) -> Iterator[str]:
    """A namespace for fixtures wider than one test (the `namespace` fixture is per test)."""
    core = kubernetes.client.CoreV1Api(kube.api_client())
    name = namespace_name(label)
    core.create_namespace({"metadata": {"name": name}})
    try:
        yield name
    finally:
        try:
            core.delete_namespace(name)
        except ApiException as error:
            if error.status != 404:
                raise


def explain(jobs: Jobs, name: str, node: Node) -> str:
    """What to look at when a job did not end as expected: its status and its workers' last log lines."""
    status = jobs.status(name)
    lines = [f"phase {status.get('phase')}, restarts {status.get('restarts')}"]
    lines += [f"  {c['type']}={c['status']} {c['reason']}: {c['message']}" for c in status.get("conditions", [])]
    for record in status.get("restartHistory", []):
        lines.append(f"  restart after attempt {record['attempt']}: {record['reason']} {record.get('message')}")
    for rank in range(WORKERS):
        pod = f"{name}-worker-{rank}"
        log = kubectl("logs", "-n", jobs.namespace, pod, "-c", TRAINER_CONTAINER, "--tail=15", check=False)
        lines += [f"--- kubectl logs {pod}"] + [f"  {line}" for line in (log.stdout or log.stderr).splitlines()]
    return "\n".join(lines)


def finish(jobs: Jobs, node: Node, phase: str, name: str = JOB, timeout: float = RUN_SECONDS) -> dict[str, Any]:
    """Wait for the job to end in `phase`; fail at once, with its story, if it ends otherwise."""

    def ended() -> dict[str, Any] | None:
        status = jobs.status(name)
        if status.get("phase") in ("Succeeded", "Failed") and status["phase"] != phase:
            raise AssertionError(f"{name} ended {status['phase']}, expected {phase}:\n{explain(jobs, name, node)}")
        return status if status.get("phase") == phase else None

    try:
        return wait_for(ended, timeout, interval=0.5, what=f"{name} to be {phase}")
    except AssertionError as error:
        if "timed out" not in str(error):
            raise
        raise AssertionError(f"{error}\n{explain(jobs, name, node)}") from None


def running_pod(jobs: Jobs, rank: int, name: str = JOB) -> Any:
    def found() -> Any:
        pods = [p for p in jobs.pods(name) if p.metadata.name == f"{name}-worker-{rank}"]
        running = pods and pods[0].status.phase == "Running" and pods[0].status.container_statuses
        return pods[0] if running and pods[0].status.container_statuses[0].state.running else None

    return wait_for(found, 60, what=f"worker {rank} of {name} to run")


def trainer_process(node: Node, pod: Any) -> psutil.Process:
    """The trainer process of a running worker pod: its container's first process, or that one's only
    child when the first is an init (tini, dumb-init)."""

    def found() -> psutil.Process | None:
        statuses = pod.status.container_statuses or []
        container_id = next((c.container_id for c in statuses if c.name == TRAINER_CONTAINER), None)
        pid = node.container_pid(container_id) if container_id else None
        if pid is None:
            return None
        try:
            first = psutil.Process(pid)
            if Path(first.cmdline()[0]).name in ("tini", "dumb-init"):
                return next(iter(first.children()), None)
            return first
        except (psutil.NoSuchProcess, IndexError):
            return None

    return wait_for(found, 30, what=f"the trainer process of {pod.metadata.name}")


def training_process(node: Node, pod: Any) -> psutil.Process:
    """The process that trains in a worker pod under the InPlace strategy: the container's own process is the
    elastic agent, whose fork server starts the training processes (the agent's grandchildren)."""
    trainer = trainer_process(node, pod)

    def child() -> psutil.Process | None:
        try:
            return next((c for c in trainer.children(recursive=True) if c.ppid() != trainer.pid), None)
        except psutil.NoSuchProcess:
            return None

    return wait_for(child, 30, what=f"the training process under {pod.metadata.name}'s agent")


def first_checkpoint(output: Path) -> int:
    """The step of the run's first checkpoint, seen at once: the tests that interrupt a run do it then."""
    steps = wait_for(lambda: checkpoint_steps(output), RUN_SECONDS, interval=0.05, what=f"a checkpoint in {output}")
    return steps[0]


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def run_job(jobs: Jobs, spec: dict[str, Any]) -> None:
    jobs.create(manifest(spec))


def describe(jobs: Jobs, name: str = JOB) -> str:
    return kubectl("describe", "ftj", name, "-n", jobs.namespace).stdout


def owned_objects(kube, namespace: str, name: str = JOB) -> list[str]:
    """Every object the operator made for the job that still exists (found by the job label)."""
    client = kube.api_client()
    core, rbac = kubernetes.client.CoreV1Api(client), kubernetes.client.RbacAuthorizationV1Api(client)
    selector = f"{LABEL_JOB}={name}"
    listers = {
        "pod": core.list_namespaced_pod,
        "service": core.list_namespaced_service,
        "configmap": core.list_namespaced_config_map,
        "serviceaccount": core.list_namespaced_service_account,
        "role": rbac.list_namespaced_role,
        "rolebinding": rbac.list_namespaced_role_binding,
    }
    return [
        f"{kind}/{item.metadata.name}"
        for kind, lister in listers.items()
        for item in lister(namespace, label_selector=selector).items
    ]


class PodRecorder:
    """Every worker pod uid the API server shows while it runs, by attempt (a watch, so none is missed)."""

    def __init__(self, kube, namespace: str, name: str = JOB) -> None:
        self.core = kubernetes.client.CoreV1Api(kube.api_client())
        self.namespace, self.selector = namespace, f"{LABEL_JOB}={name}"
        self.uids: dict[str, set[str]] = defaultdict(set)
        self.stopped = threading.Event()
        self.watch = kubernetes.watch.Watch()
        self.thread = threading.Thread(target=self._record, daemon=True)

    def __enter__(self) -> PodRecorder:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopped.set()
        self.watch.stop()
        self.thread.join(timeout=10)

    def _record(self) -> None:
        while not self.stopped.is_set():
            self.watch = kubernetes.watch.Watch()
            try:
                # Each (re)start lists the pods first: a pod seen once is never lost.
                for event in self.watch.stream(
                    self.core.list_namespaced_pod, self.namespace, label_selector=self.selector, timeout_seconds=60
                ):
                    pod = event["object"]
                    self.uids[pod.metadata.labels[LABEL_ATTEMPT]].add(pod.metadata.uid)
            except (ApiException, urllib3.exceptions.HTTPError):
                self.stopped.wait(1)  # the API server failed the watch (or is away): start another, no busy loop


# --- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def happy_run(kube, operator, node, tiny_assets) -> Iterator[Run]:
    """The uninterrupted run the others compare their adapters with; its namespace lives for the module."""
    with fresh_namespace(kube, "happy-path") as namespace:
        output = create_runs_claim(kube, namespace, node) / JOB
        jobs = Jobs(kube.api_client(), namespace)
        run_job(jobs, cluster_spec(tiny_assets))
        yield Run(namespace, finish(jobs, node, "Succeeded"), output)


@pytest.fixture
def happy_job(jobs, runs, operator, tiny_assets) -> Path:
    """The happy path's job created in this test's namespace; returns its output folder."""
    run_job(jobs, cluster_spec(tiny_assets))
    return runs / JOB


# --- the cases -----------------------------------------------------------------------------------------


def test_happy_path_trains_and_saves_the_adapter(happy_run):
    assert happy_run.status["restarts"] == 0
    assert (happy_run.output / "adapter" / "adapter_config.json").is_file()
    assert (happy_run.output / "adapter" / "adapter_model.safetensors").is_file()
    run_metrics = metrics(happy_run.output)
    assert run_metrics["global_step"] == TOTAL_STEPS
    assert run_metrics["restarts"] == 0 and run_metrics["resumed_from_step"] is None
    assert run_metrics["world_size"] == WORKERS
    assert run_metrics["train_loss"] > 0
    assert happy_run.status["progress"]["step"] == TOTAL_STEPS
    assert happy_run.status["workers"]["total"] == WORKERS


def test_worker_killed_after_a_checkpoint_restarts_the_gang_and_gives_the_same_adapter(
    jobs, node, happy_job, happy_run
):
    first_checkpoint(happy_job)
    trainer_process(node, running_pod(jobs, 1)).send_signal(signal.SIGKILL)

    status = finish(jobs, node, "Succeeded")

    assert status["restarts"] == 1
    cause = status["restartHistory"][0]
    assert cause["exitCode"] == 128 + signal.SIGKILL, cause
    assert metrics(happy_job)["restarts"] == 1
    assert metrics(happy_job)["resumed_from_step"] % CHECKPOINT_INTERVAL == 0
    assert adapter_difference(happy_job, happy_run.output) <= EXACT


def test_a_killed_training_process_restarts_in_place_keeping_every_pod(kube, jobs, node, happy_job, happy_run):
    with PodRecorder(kube, jobs.namespace) as recorded:
        first_checkpoint(happy_job)
        training_process(node, running_pod(jobs, 1)).send_signal(signal.SIGKILL)
        status = finish(jobs, node, "Succeeded")

    assert dict(recorded.uids) == {"0": {p.metadata.uid for p in jobs.pods(JOB)}}  # no pod deleted or made
    assert (status["restarts"], status["attempt"]) == (1, 0)
    record = status["restartHistory"][0]
    assert (record["kind"], record["pod"], record["exitCode"]) == ("InPlace", f"{JOB}-worker-1", 137), record
    assert metrics(happy_job)["resumed_from_step"] % CHECKPOINT_INTERVAL == 0
    assert adapter_difference(happy_job, happy_run.output) <= EXACT
    assert "RestartedInPlace" in describe(jobs)
    log = kubectl("logs", "-n", jobs.namespace, f"{JOB}-worker-1", "-c", TRAINER_CONTAINER).stdout
    assert "in place" in log, log[-3000:]


def test_a_pod_lost_after_an_in_place_restart_is_made_again_and_the_budget_counts_both(
    kube, jobs, node, happy_job, happy_run
):
    first_checkpoint(happy_job)
    training_process(node, running_pod(jobs, 1)).send_signal(signal.SIGKILL)
    wait_for(lambda: jobs.status(JOB).get("restarts") == 1, RUN_SECONDS, interval=0.5, what="the in-place restart")
    kubectl("delete", "pod", f"{JOB}-worker-0", "-n", jobs.namespace, "--wait=false")

    status = finish(jobs, node, "Succeeded")

    assert (status["restarts"], status["attempt"]) == (2, 1)  # maxRestarts is 2: both spent, none more
    assert [(r["kind"], r["reason"]) for r in status["restartHistory"]] == [
        ("InPlace", "SIGKILL"),
        ("Crash", "Deleted"),
    ]
    assert adapter_difference(happy_job, happy_run.output) <= EXACT


def test_worker_pod_deleted_with_kubectl_restarts_the_gang(jobs, node, happy_job, happy_run):
    first_checkpoint(happy_job)
    running_pod(jobs, 1)
    kubectl("delete", "pod", f"{JOB}-worker-1", "-n", jobs.namespace, "--wait=false")

    status = finish(jobs, node, "Succeeded")

    assert status["restarts"] == 1
    assert status["restartHistory"][0]["reason"] == "Deleted"
    assert metrics(happy_job)["restarts"] == 1
    assert adapter_difference(happy_job, happy_run.output) <= EXACT


def test_sigterm_checkpoints_and_the_restart_loses_no_steps(jobs, node, happy_job, happy_run):
    first_checkpoint(happy_job)
    trainer = trainer_process(node, running_pod(jobs, 1))
    trainer.send_signal(signal.SIGTERM)
    trainer.wait(timeout=60)  # not our child: its exit code is in the pod's status, below

    status = finish(jobs, node, "Succeeded")

    assert status["restarts"] == 1
    cause = status["restartHistory"][0]
    assert cause["exitCode"] == 143, cause
    stopped_at = int(re.search(r"stopped by .* at step (\d+)/", cause["message"]).group(1))
    run_metrics = metrics(happy_job)
    assert run_metrics["resumed_from_step"] == stopped_at  # no step lost
    assert run_metrics["restarts"] == 1 and run_metrics["global_step"] == TOTAL_STEPS
    assert adapter_difference(happy_job, happy_run.output) <= EXACT


def test_a_corrupt_newest_checkpoint_is_skipped_with_a_warning(jobs, runs, operator, node, tiny_assets, happy_run):
    # The finished happy run's checkpoints, the newest truncated as a failing disk might leave it.
    output = runs / JOB
    shutil.copytree(happy_run.output / "checkpoints", output / "checkpoints")
    owner = runs.stat()  # the workers' user, as the provisioner made the claim
    for path in [output, *output.rglob("*")]:
        os.chown(path, owner.st_uid, owner.st_gid)
    steps = checkpoint_steps(output)
    newest, previous = steps[-1], steps[-2]
    weights = output / "checkpoints" / f"step-{newest}" / "adapter" / "adapter_model.safetensors"
    with weights.open("r+b") as file:
        file.truncate(weights.stat().st_size // 2)

    run_job(jobs, cluster_spec(tiny_assets))
    status = finish(jobs, node, "Succeeded")

    assert status["restarts"] == 0
    log = kubectl("logs", "-n", jobs.namespace, f"{JOB}-worker-0", "-c", TRAINER_CONTAINER).stdout
    assert f"skipping corrupt checkpoint /mnt/finetune/output/checkpoints/step-{newest}" in log
    assert metrics(output)["resumed_from_step"] == previous
    assert adapter_difference(output, happy_run.output) <= EXACT


def test_missing_dataset_fails_at_once_naming_the_path(jobs, runs, operator, node, tiny_assets):
    missing = "/assets/no-such-file.jsonl"
    run_job(jobs, cluster_spec(tiny_assets, dataset={"path": missing}))

    status = finish(jobs, node, "Failed", timeout=FAIL_SECONDS)

    assert status["restarts"] == 0
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "PermanentError" and missing in failed["message"]
    assert missing in describe(jobs)


def test_exhausted_restarts_fail_the_job(jobs, runs, operator, node, tiny_assets):
    always_fails = ["python", "-c", "import sys; print('simulated crash'); sys.exit(1)"]
    run_job(jobs, cluster_spec(tiny_assets, command=always_fails, restartPolicy={"maxRestarts": 1}))

    status = finish(jobs, node, "Failed", timeout=FAIL_SECONDS)

    assert status["restarts"] == 1
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "RestartLimitExceeded"
    assert "maxRestarts=1" in failed["message"] and "exit code 1" in failed["message"]


def test_operator_killed_mid_job_duplicates_no_pod(kube, jobs, runs, operator, node, tiny_assets):
    output = runs / JOB
    with PodRecorder(kube, jobs.namespace) as recorder:
        run_job(jobs, cluster_spec(tiny_assets))
        try:
            wait_for(lambda: jobs.pods(JOB), 60, interval=0.05, what="the first worker pod")
            operator.kill()  # while it creates the gang
            operator.start()
            first_checkpoint(output)
            operator.kill()  # while the gang trains
            operator.start()
        finally:
            if operator.process.poll() is not None:
                operator.start()
        status = finish(jobs, node, "Succeeded")

    assert status["restarts"] == 0
    assert recorder.uids.keys() == {"0"}
    assert len(recorder.uids["0"]) == WORKERS, recorder.uids
    assert metrics(output)["global_step"] == TOTAL_STEPS and (output / "adapter").is_dir()


def test_deleting_the_job_mid_run_stops_the_workers_and_leaves_nothing(kube, jobs, happy_job, node):
    first_checkpoint(happy_job)
    pods = [running_pod(jobs, rank) for rank in range(WORKERS)]
    trainers = [trainer_process(node, pod) for pod in pods]

    kubectl("delete", "ftj", JOB, "-n", jobs.namespace)

    wait_for(lambda: not any(alive(trainer) for trainer in trainers), 60, what="the worker processes to stop")
    try:  # Garbage collection: 60 s was missed once in two cold runs (cause open; the failure names what is left).
        wait_for(lambda: not owned_objects(kube, jobs.namespace), 180, what="the job's objects to be deleted")
    except AssertionError as timeout:
        raise AssertionError(f"{timeout}; left: {owned_objects(kube, jobs.namespace)}") from timeout
    assert jobs.get(JOB) is None
    container_ids = [pod.status.container_statuses[0].container_id for pod in pods]
    assert not any(node.container_pid(container_id) for container_id in container_ids)


@pytest.mark.parametrize("launcher", ["python", "torchrun"])
def test_our_own_ddp_script_runs_through_spec_command(jobs, runs, operator, node, launcher):
    jobs.create(manifest(ddp_spec(launcher), name="ddp"))

    status = finish(jobs, node, "Succeeded", name="ddp", timeout=FAIL_SECONDS)

    assert status["restarts"] == 0
    results = ddp_results(runs / "ddp")
    assert [r["sum"] for r in results] == [3.0, 3.0]  # (0 + 1) + (1 + 1) from the two ranks
    assert [r["rank"] for r in results] == [0, 1] and {r["world_size"] for r in results} == {2}
    assert results[0]["hostnames"] == ["ddp-worker-0", "ddp-worker-1"]
    assert {r["master_addr"] for r in results} == {f"ddp-worker-0.ddp.{jobs.namespace}.svc"}
    assert {r["under_torchrun"] for r in results} == {launcher == "torchrun"}


def test_a_worker_over_its_memory_limit_is_oom_killed_and_the_gang_restarts(jobs, runs, operator, node, tiny_assets):
    hog = ["python", "-c", "data = b'x' * (1 << 30)"]  # 1 GiB against a 128 MiB limit
    limits = {"resources": {"limits": {"memory": "128Mi"}}}
    run_job(jobs, cluster_spec(tiny_assets, command=hog, template=limits, restartPolicy={"maxRestarts": 1}))

    status = finish(jobs, node, "Failed", timeout=FAIL_SECONDS)

    assert status["restarts"] == 1
    assert [(r["reason"], r["exitCode"]) for r in status["restartHistory"]] == [("OOMKilled", 137)]


def test_a_readwriteonce_claim_only_worker_0_mounts_holds_the_data_set(jobs, runs, operator, node, tiny_assets):
    """Only worker-0 mounts the job's claim (ReadWriteOnce works across nodes); the data set on it reaches
    the other rank from rank 0, which reads and tokenizes it once."""
    run_dir = runs / JOB  # storage.subPath defaults to the job's name
    (run_dir / "data").mkdir(parents=True)
    shutil.copy(tiny_assets / "train.jsonl", run_dir / "data" / "train.jsonl")
    for path in (run_dir, run_dir / "data"):
        os.chown(path, WORKER_UID, WORKER_UID)  # the trainer writes its outputs beside the data
    run_job(jobs, cluster_spec(tiny_assets, dataset={"path": f"{OUTPUT_MOUNT_PATH}/data/train.jsonl"}))

    pods = wait_for(lambda: len(jobs.pods(JOB)) == WORKERS and jobs.pods(JOB), 60, what="the gang's pods")
    claims = {
        pod.metadata.name: [v.persistent_volume_claim.claim_name for v in pod.spec.volumes if v.persistent_volume_claim]
        for pod in pods
    }
    status = finish(jobs, node, "Succeeded")

    assert claims == {f"{JOB}-worker-0": ["runs"], f"{JOB}-worker-1": []}
    assert status["restarts"] == 0 and (run_dir / ADAPTER_WEIGHTS).exists()
