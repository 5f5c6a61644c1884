"""`make demo`: the whole path on this machine in a few minutes, no Docker, no GPU.

1. start (or reuse) the embedded cluster in .demo/cluster, with its real node (kubelet, containerd),
   and build (cached) and import the operator and trainer images;
2. install the operator with the Helm chart (charts/finetune-operator): its Deployment runs
   `finetune operator` from the operator image, with the chart's ServiceAccount and RBAC;
3. make a tiny model and data set, offline, on the claim `demo-data` (a pod does it);
4. apply examples/demo-job.yaml (2 workers) and stream `kubectl get ftj -w`;
5. once a checkpoint exists, SIGKILL one worker's trainer process: the operator restarts the gang,
   which resumes from the checkpoint;
6. wait for Succeeded, show `kubectl get ftj` and `kubectl describe ftj demo`, and say where the
   adapter is.

    make demo        # python -m finetune_dev.demo (again: reuses the cluster, reruns the job)
    make demo-down   # stop the cluster
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import helm_python as helm
import kubernetes
import psutil
from kubernetes.client import ApiException

from finetune_dev.cluster import ClusterError, ControlPlane, cluster_up, ensure_binaries
from finetune_dev.cluster.provisioner import claim_folder
from finetune_dev.images import image_refs
from finetune_operator.local import LocalSpecError, load_job

REPO = Path(__file__).resolve().parents[2]
DEMO_DIR = REPO / ".demo"
CLUSTER_DIR = DEMO_DIR / "cluster"
CHART = REPO / "charts" / "finetune-operator"
JOB_FILE = REPO / "examples" / "demo-job.yaml"
RELEASE, OPERATOR_NAMESPACE = "finetune", "finetune-system"
NAMESPACE, JOB = "default", "demo"
DATA_CLAIM, RUNS_CLAIM = "demo-data", "runs"
DATA_MOUNT = "/var/lib/finetune-demo"  # where examples/demo-job.yaml mounts the claim demo-data
PREP_POD = "demo-data-prep"
WORKER_TO_KILL = f"{JOB}-worker-1"
CRDS = ["finetunejobs.finetune.dev"]
JOB_TIMEOUT_SECONDS = 480.0

T = TypeVar("T")


def adopt_into_release(api_client: kubernetes.client.ApiClient, crds: list[str], release: str, namespace: str) -> None:
    """Let a Helm release take over CRDs that exist already (e.g. from `kubectl apply -f crds/`).

    Helm refuses to install over objects that are not marked as its own; these labels and annotations are
    Helm's documented way to adopt them.
    """
    extensions = kubernetes.client.ApiextensionsV1Api(api_client)
    mark = {
        "metadata": {
            "labels": {"app.kubernetes.io/managed-by": "Helm"},
            "annotations": {"meta.helm.sh/release-name": release, "meta.helm.sh/release-namespace": namespace},
        }
    }
    for name in crds:
        try:
            extensions.patch_custom_resource_definition(name, mark)
        except ApiException as e:
            if e.status != 404:
                raise


# The embedded cluster's one node has this machine's few cores: the chart's per-GPU defaults (sized for GPU
# nodes) would leave the demo's CPU workers Pending.
SMALL_NODE = {"trainer": {"resources": {"cpuPerGpu": "250m", "memoryPerGpu": "2Gi"}, "modelCacheSize": "1Gi"}}


class DemoError(Exception):
    """An expected failure: the message says what went wrong and where to look."""


class Demo:
    def __init__(self) -> None:
        self.started = time.monotonic()
        self.kubeconfig: Path | None = None
        self.kubectl_path = ""
        self.core: Any = None
        self.custom: Any = None
        self.node = ControlPlane(CLUSTER_DIR).node()
        self.node_dir = self.node.folder
        self.images: dict[str, str] = {}

    # --- output -------------------------------------------------------------------------------------

    def say(self, text: str) -> None:
        elapsed = int(time.monotonic() - self.started)
        print(f"\n[{elapsed // 60}:{elapsed % 60:02d}] ==> {text}", flush=True)

    def note(self, text: str) -> None:
        print(f"    {text}", flush=True)

    # --- the steps ----------------------------------------------------------------------------------

    def run(self) -> None:
        self.start_cluster()
        self.install_operator()
        self.prepare_data()
        self.apply_job()
        with KubectlWatch([*self.kubectl_command, "get", "ftj", "-w", "-n", NAMESPACE], self.env()):
            step = self.wait_for_checkpoint()
            self.kill_a_worker(step)
            status = self.wait_for_the_end()
        self.show_result(status)

    def start_cluster(self) -> None:
        self.say(
            f"starting the embedded cluster in {CLUSTER_DIR.relative_to(REPO)} (reused if it runs), its node with "
            "the operator and trainer images (built from their Dockerfiles the first time, then cached)"
        )
        logging.basicConfig(level=logging.INFO, format="    %(message)s")  # a first build reports progress
        self.kubeconfig = cluster_up(CLUSTER_DIR)
        bundled = ensure_binaries() / "kubectl"
        self.kubectl_path = str(bundled) if bundled.exists() else shutil.which("kubectl") or ""
        if not self.kubectl_path:
            raise DemoError("no kubectl found: run `make setup`, which builds one")
        client = kubernetes.config.new_client_from_config(config_file=str(self.kubeconfig))
        self.core = kubernetes.client.CoreV1Api(client)
        self.custom = kubernetes.client.CustomObjectsApi(client)
        self.note(f"export KUBECONFIG={self.kubeconfig}")
        self.images = image_refs()  # cluster_up imported them
        self.note(", ".join(self.images.values()))

    def install_operator(self) -> None:
        self.say(
            f"installing the operator with Helm: release {RELEASE} of {CHART.relative_to(REPO)} in {OPERATOR_NAMESPACE}"
        )
        self._adopt_crds()
        with helm.Config(kubeconfig_path=str(self.kubeconfig), namespace=OPERATOR_NAMESPACE) as config:
            try:
                if has_release(config):
                    # The release's values (its ports) again: an unchanged pod template keeps the operator running.
                    config.upgrade(CHART, RELEASE, None, namespace=OPERATOR_NAMESPACE, reuse_values=True, timeout=120)
                    self.note("upgraded the release installed by an earlier run")
                else:
                    # The chart's image tags are its appVersion: the images just imported, so nothing is pulled.
                    # The small node gets small per-GPU requests.
                    values = dict(SMALL_NODE)
                    config.install(
                        CHART, RELEASE, values, namespace=OPERATOR_NAMESPACE, create_namespace=True, timeout=120
                    )
            except helm.HelmError as e:
                raise DemoError(f"helm could not install {CHART.relative_to(REPO)}: {e}") from e
        pod = self.wait(self._operator_pod_running, 120, "the operator pod to run")
        self.note(
            f"operator pod {OPERATOR_NAMESPACE}/{pod} runs `finetune operator` from {self.images['operator']}; "
            f"its log: kubectl logs -n {OPERATOR_NAMESPACE} {pod}"
        )

    def _adopt_crds(self) -> None:
        adopt_into_release(self.core.api_client, CRDS, RELEASE, OPERATOR_NAMESPACE)

    def _operator_pod_running(self) -> str | None:
        selector = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=operator"
        pods = self.core.list_namespaced_pod(OPERATOR_NAMESPACE, label_selector=selector).items
        running = [p for p in pods if p.status.phase == "Running" and not p.metadata.deletion_timestamp]
        return running[0].metadata.name if len(running) == 1 and len(pods) == 1 else None

    def prepare_data(self) -> None:
        self.say("making a tiny model and data set (offline) on the claim demo-data")
        if self.job() is not None:
            self.note("deleting the demo job of an earlier run, and its claim runs (a fresh run, not a resume)")
            self.custom.delete_namespaced_custom_object("finetune.dev", "v1alpha1", NAMESPACE, "finetunejobs", JOB)
            self.wait(lambda: self.job() is None and not self.worker_pods(), 90, "the earlier demo job to go")
        self.delete_claim(RUNS_CLAIM)
        self.create_claim(RUNS_CLAIM)
        self.create_claim(DATA_CLAIM)
        data_dir = claim_folder(self.node_dir, NAMESPACE, DATA_CLAIM)
        if (data_dir / "tiny-llama" / "config.json").exists() and (data_dir / "alpaca.jsonl").exists():
            self.note(f"already there from an earlier run: {data_dir}")
            return
        self.delete_pod(PREP_POD)
        self.core.create_namespaced_pod(NAMESPACE, prep_pod(self.images["trainer"]))
        phase = self.wait(
            lambda: self.pod_phase(PREP_POD) in ("Succeeded", "Failed") and self.pod_phase(PREP_POD),
            180,
            "the data pod to finish",
        )
        if phase != "Succeeded":
            raise DemoError(f"the pod {PREP_POD} failed; its log:\n{self.pod_log(NAMESPACE, PREP_POD)}")
        self.note(f"{DATA_MOUNT}/tiny-llama and {DATA_MOUNT}/alpaca.jsonl, on this machine in {data_dir}")
        self.delete_pod(PREP_POD)

    def apply_job(self) -> None:
        self.say(
            f"kubectl apply -f {JOB_FILE.relative_to(REPO)}: 2 workers, a checkpoint every 10 steps; "
            "streaming `kubectl get ftj -w`:"
        )
        self.kubectl("apply", "-f", str(JOB_FILE), "-n", NAMESPACE)

    def wait_for_checkpoint(self) -> int:
        checkpoints = self.run_dir() / "checkpoints"

        def first_checkpoint() -> int | None:
            self.fail_if_finished_badly()
            steps = sorted(int(path.name.removeprefix("step-")) for path in checkpoints.glob("step-*"))
            return steps[0] if steps else None

        return self.wait(first_checkpoint, JOB_TIMEOUT_SECONDS, "a first checkpoint")

    def kill_a_worker(self, step: int) -> None:
        trainer = self.trainer_process()
        self.say(
            f"checkpoint at step {step} saved: SIGKILL to the trainer process of {WORKER_TO_KILL} "
            f"(pid {trainer.pid}), as if its node died"
        )
        trainer.send_signal(signal.SIGKILL)
        self.note(
            "the operator sees the worker fail, deletes the gang and creates the next attempt, which "
            "resumes from the newest checkpoint"
        )

    def trainer_process(self) -> Any:
        """The worker's trainer: its container's first process (or that one's child under an init)."""

        def found() -> Any:
            if self.pod_phase(WORKER_TO_KILL) in ("Succeeded", "Failed"):
                raise DemoError(f"{WORKER_TO_KILL} ended before it could be killed; run `make demo` again")
            statuses = self.core.read_namespaced_pod(WORKER_TO_KILL, NAMESPACE).status.container_statuses or []
            container_id = next((c.container_id for c in statuses if c.state.running), None)
            pid = self.node.container_pid(container_id) if container_id else None
            try:
                first = psutil.Process(pid) if pid else None
                if first and Path(first.cmdline()[0]).name in ("tini", "dumb-init"):
                    return next(iter(first.children()), None)
                return first
            except (psutil.NoSuchProcess, IndexError):
                return None

        return self.wait(found, 30, f"the trainer process of {WORKER_TO_KILL}")

    def wait_for_the_end(self) -> dict[str, Any]:
        def finished() -> dict[str, Any] | None:
            status = (self.job() or {}).get("status") or {}
            return status if status.get("phase") in ("Succeeded", "Failed") else None

        status = self.wait(finished, JOB_TIMEOUT_SECONDS, "the job to finish")
        if status["phase"] != "Succeeded":
            self.kubectl("describe", "ftj", JOB, "-n", NAMESPACE, echo=True)
            raise DemoError(f"the job {JOB} failed; worker logs: kubectl logs {JOB}-worker-0")
        return status

    def show_result(self, status: dict[str, Any]) -> None:
        self.say("kubectl get ftj")
        self.kubectl("get", "ftj", "-n", NAMESPACE, echo=True)
        self.say(f"kubectl describe ftj {JOB}")
        self.kubectl("describe", "ftj", JOB, "-n", NAMESPACE, echo=True)
        run_dir = self.run_dir()
        metrics = json.loads((run_dir / "metrics.json").read_text())
        elapsed = time.monotonic() - self.started
        self.say(f"{JOB} Succeeded after {status.get('restarts', 0)} restart(s) in {elapsed / 60:.1f} minutes")
        self.note(f"adapter:  claim {RUNS_CLAIM}, {JOB}/adapter; on this machine {run_dir / 'adapter'}")
        self.note(
            f"metrics:  {run_dir / 'metrics.json'}: global_step {metrics.get('global_step')}, "
            f"train_loss {metrics.get('train_loss', 0):.3f}, restarts {metrics.get('restarts')}, "
            f"resumed_from_step {metrics.get('resumed_from_step')}"
        )
        self.note(f"logs:     kubectl logs {JOB}-worker-<rank>")
        self.note(f"explore:  export KUBECONFIG={self.kubeconfig}; kubectl get ftj,pods -A")
        self.note("stop:     make demo-down")

    # --- Kubernetes helpers ---------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    @property
    def kubectl_command(self) -> list[str]:
        # Discovery cached with the cluster: ~/.kube/cache is keyed by host:port, which other clusters reuse.
        return [self.kubectl_path, f"--cache-dir={CLUSTER_DIR / 'kubectl-cache'}"]

    def kubectl(self, *args: str, echo: bool = False) -> str:
        command = [*self.kubectl_command, *args]
        done = subprocess.run(command, env=self.env(), capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise DemoError(f"kubectl {' '.join(args)} failed: {done.stderr.strip()}")
        if echo:
            print(done.stdout, end="", flush=True)
        return done.stdout

    def job(self) -> dict[str, Any] | None:
        try:
            return self.custom.get_namespaced_custom_object("finetune.dev", "v1alpha1", NAMESPACE, "finetunejobs", JOB)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def fail_if_finished_badly(self) -> None:
        if ((self.job() or {}).get("status") or {}).get("phase") == "Failed":
            self.kubectl("describe", "ftj", JOB, "-n", NAMESPACE, echo=True)
            raise DemoError(f"the job {JOB} failed before its first checkpoint")

    def worker_pods(self) -> list[Any]:
        return self.core.list_namespaced_pod(NAMESPACE, label_selector=f"finetune.dev/job={JOB}").items

    def run_dir(self) -> Path:
        return claim_folder(self.node_dir, NAMESPACE, RUNS_CLAIM) / JOB

    def create_claim(self, name: str) -> None:
        claim = {
            "metadata": {"name": name},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
        }
        try:
            self.core.create_namespaced_persistent_volume_claim(NAMESPACE, claim)
        except ApiException as e:
            if e.status != 409:
                raise
        self.wait(
            lambda: self.core.read_namespaced_persistent_volume_claim(name, NAMESPACE).status.phase == "Bound",
            60,
            f"the claim {name} to be bound",
        )

    def delete_claim(self, name: str) -> None:
        def gone() -> bool:
            try:
                self.core.read_namespaced_persistent_volume_claim(name, NAMESPACE)
            except ApiException as e:
                return e.status == 404
            return False

        if not gone():
            self.core.delete_namespaced_persistent_volume_claim(name, NAMESPACE)
            self.wait(gone, 60, f"the claim {name} to be deleted")

    def delete_pod(self, name: str) -> None:
        try:
            self.core.delete_namespaced_pod(name, NAMESPACE, grace_period_seconds=0)
        except ApiException as e:
            if e.status != 404:
                raise
        self.wait(lambda: self.pod_phase(name) is None, 60, f"the pod {name} to be deleted")

    def pod_phase(self, name: str) -> str | None:
        try:
            return self.core.read_namespaced_pod(name, NAMESPACE).status.phase
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def pod_log(self, namespace: str, pod: str) -> str:
        argv = [*self.kubectl_command, "logs", "-n", namespace, pod, "--tail=20"]
        done = subprocess.run(argv, env=self.env(), capture_output=True, text=True)
        return done.stdout or done.stderr

    def wait(self, probe: Callable[[], T | None], timeout: float, what: str) -> T:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = probe()
            if result:
                return result
            time.sleep(0.25)
        raise DemoError(
            f"timed out after {timeout:.0f} s waiting for {what}; the cluster's logs are in "
            f"{CLUSTER_DIR / 'logs'}, the node's in {self.node_dir / 'logs'}"
        )


class KubectlWatch:
    """`kubectl get ... -w` in the background, its lines indented under the demo's own."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.argv, self.env = argv, env
        self.process: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None

    def __enter__(self) -> KubectlWatch:
        self.process = subprocess.Popen(
            self.argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.thread = threading.Thread(target=self._copy, args=(self.process.stdout or [],), daemon=True)
        self.thread.start()
        return self

    @staticmethod
    def _copy(lines: Iterable[str]) -> None:
        for line in lines:
            print(f"    | {line}", end="", flush=True)

    def __exit__(self, *_: object) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
        if self.thread is not None:
            self.thread.join(timeout=5)


def prep_pod(image: str) -> dict[str, Any]:
    """A pod that writes the tiny model and data set onto the claim demo-data (nothing is downloaded)."""
    command = [
        "python",
        "-m",
        "finetune_trainer.tiny",
        "--model-dir",
        f"{DATA_MOUNT}/tiny-llama",
        "--data",
        f"{DATA_MOUNT}/alpaca.jsonl",
        "--format",
        "alpaca",
        "--examples",
        "256",
    ]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": PREP_POD, "labels": {"app.kubernetes.io/part-of": "finetune-demo"}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "prep",
                    "image": image,
                    "imagePullPolicy": "IfNotPresent",
                    "command": command,
                    "volumeMounts": [{"name": "data", "mountPath": DATA_MOUNT}],
                }
            ],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": DATA_CLAIM}}],
        },
    }


def has_release(config: Any) -> bool:
    try:
        config.status(RELEASE)
    except helm.HelmNotFoundError:
        return False
    return True


def main() -> int:
    if not (CHART / "Chart.yaml").exists() or not JOB_FILE.exists():
        print(f"demo: run it from a clone of the repository (no {CHART} or {JOB_FILE})", file=sys.stderr)
        return 1
    demo = Demo()
    try:
        load_job(JOB_FILE)  # a broken example fails here, naming the field, before any cluster work
        demo.run()
    except KeyboardInterrupt:
        print("\ndemo: interrupted; the cluster keeps running (make demo-down stops it)", file=sys.stderr)
        return 130
    except (DemoError, ClusterError, LocalSpecError) as e:  # expected failures: a message, not a stack trace
        print(f"\ndemo failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
