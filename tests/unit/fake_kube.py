"""An in-memory stand-in for finetune_operator.kube (the operator's only API client), with the API server
behaviour the reconciler depends on: resourceVersion conflicts, generations, uids, ownerReferences,
graceful pod deletion that a node's kubelet confirms, finalizers, garbage collection, 403/422 refusals.

Tests also play the scheduler and the kubelet through it, and drive the reconciler with `Operator`.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from finetune_operator import kube
from finetune_operator.api import FineTuneJobSpec
from finetune_operator.builders import LABEL_JOB, PROGRESS_CONFIG_MAP_NAME
from finetune_operator.config import OperatorSettings
from finetune_operator.informer import worker_view
from finetune_operator.reconciler import Companions, Freshness, Outcome, OwnedProgress, reconcile_job
from finetune_operator.status import DEPARTED, Event, rfc3339
from finetune_trainer.contract import PROGRESS_KEY, ProgressReport

START = datetime(2026, 1, 1, tzinfo=timezone.utc)
NAMESPACE = "ml"
Key = tuple[str, str, str]  # kind, namespace, name


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch, as the API server applies a merge-patch+json body."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


@dataclass
class FakeKube:
    now: datetime = START
    objects: dict[Key, dict[str, Any]] = field(default_factory=dict)
    lost_nodes: set[str] = field(default_factory=set)  # nodes whose kubelet never confirms a deletion
    refuse_creates: dict[str, tuple[int, str, str]] = field(default_factory=dict)  # kind -> (status, reason, msg)
    fail_deletes: bool = False  # the API server answers deletes with a 500
    requests: list[str] = field(default_factory=list)
    posted: list[tuple[str, str, str]] = field(default_factory=list)  # kube.post_event: type, reason, message
    _versions: itertools.count = field(default_factory=lambda: itertools.count(1))
    _uids: itertools.count = field(default_factory=lambda: itertools.count(1))

    # --- what kube.py offers the operator -------------------------------------------------------------
    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.requests.append(f"GET FineTuneJob {name}")
        job = self.objects.get(("FineTuneJob", namespace, name))
        return copy.deepcopy(job)

    def patch_job_status(self, namespace: str, name: str, status: dict, resource_version: str | None) -> dict:
        self.requests.append(f"PATCH FineTuneJob {name}/status")
        job = self.objects.get(("FineTuneJob", namespace, name))
        if job is None or (resource_version is not None and job["metadata"]["resourceVersion"] != resource_version):
            raise kube.StatusConflict(f"{namespace}/{name} changed since it was read")
        job["status"] = merge_patch(job.get("status") or {}, status)
        self._bump(job)
        return copy.deepcopy(job)

    def post_event(self, involved: dict[str, Any], type: str, reason: str, message: str) -> None:
        self.requests.append(f"CREATE Event {involved['metadata']['name']}")
        self.posted.append((type, reason, message))

    def delete_job(self, namespace: str, name: str, uid: str) -> None:
        self.requests.append(f"DELETE FineTuneJob {name}")
        job = self.objects.get(("FineTuneJob", namespace, name))
        if job is not None and job["metadata"]["uid"] == uid:  # the uid precondition
            del self.objects[("FineTuneJob", namespace, name)]

    def replace(self, obj: dict[str, Any], timeout: float | None = None) -> bool:
        metadata = obj["metadata"]
        key = (obj["kind"], metadata["namespace"], metadata["name"])
        self.requests.append(f"REPLACE {obj['kind']} {metadata['name']}")
        stored = self.objects.get(key)
        if stored is None or stored["metadata"]["resourceVersion"] != metadata.get("resourceVersion"):
            return False  # 409
        self.objects[key] = {**copy.deepcopy(obj), "metadata": {**stored["metadata"], **copy.deepcopy(metadata)}}
        self._bump(self.objects[key])
        return True

    def patch(self, kind: str, namespace: str, name: str, changes: dict[str, Any], resource_version: str) -> bool:
        self.requests.append(f"PATCH {kind} {name}")
        stored = self.objects.get((kind, namespace, name))
        if stored is None or stored["metadata"]["resourceVersion"] != resource_version:
            return False  # 404, 409
        self.objects[(kind, namespace, name)] = merge_patch(stored, changes)
        self._bump(self.objects[(kind, namespace, name)])
        return True

    def get(self, kind: str, namespace: str, name: str, timeout: float | None = None) -> dict[str, Any] | None:
        self.requests.append(f"GET {kind} {name}")
        return copy.deepcopy(self.objects.get((kind, namespace, name)))

    def create(self, obj: dict[str, Any]) -> bool:
        kind, metadata = obj["kind"], obj["metadata"]
        self.requests.append(f"CREATE {kind} {metadata['name']}")
        if kind in self.refuse_creates:
            status, reason, message = self.refuse_creates[kind]
            text = f"{kind} {metadata['name']}: {message}"
            if status == kube.INVALID:
                raise kube.ObjectRejected(text)
            raise kube.CreationRefused(text, reason)
        key = (kind, metadata["namespace"], metadata["name"])
        if key in self.objects:
            return False
        stored = copy.deepcopy(obj)
        stored["metadata"] |= {"uid": f"uid-{next(self._uids)}", "creationTimestamp": rfc3339(self.now)}
        if kind == "Pod":
            stored["status"] = {"phase": "Pending"}
        self._bump(stored)
        self.objects[key] = stored
        return True

    def delete_pod(self, namespace: str, name: str, uid: str | None = None, grace_period_seconds=None) -> bool:
        self.requests.append(f"DELETE Pod {name}" + (" grace=0" if grace_period_seconds == 0 else ""))
        if self.fail_deletes:
            raise RuntimeError("500 Internal Server Error")
        pod = self.objects.get(("Pod", namespace, name))
        if pod is None or (uid and pod["metadata"]["uid"] != uid):
            return False
        self._delete_pod(pod, grace_period_seconds)
        return True

    def owner_uids(self, kind: str, namespace: str, name: str) -> list[str] | None:
        obj = self.objects.get((kind, namespace, name))
        return None if obj is None else [ref["uid"] for ref in obj["metadata"].get("ownerReferences", [])]

    def delete(self, kind: str, namespace: str, name: str) -> None:
        self.requests.append(f"DELETE {kind} {name}")
        self.objects.pop((kind, namespace, name), None)

    # --- the user, the scheduler, the kubelet and the garbage collector ---------------------------------
    def apply_job(self, name: str, **spec: Any) -> dict[str, Any]:
        """Create a job; the API server fills the schema's defaults."""
        raw = {"model": "org/base", "dataset": {"path": "/data/train.jsonl"}, "workers": 2, **spec}
        job = {
            "apiVersion": "finetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {
                "name": name,
                "namespace": NAMESPACE,
                "uid": f"uid-{next(self._uids)}",
                "generation": 1,
                "creationTimestamp": rfc3339(self.now),
            },
            "spec": self._defaulted(raw),
        }
        self._bump(job)
        self.objects[("FineTuneJob", NAMESPACE, name)] = job
        return job

    def edit_job(self, name: str, **spec: Any) -> None:
        job = self.objects[("FineTuneJob", NAMESPACE, name)]
        new = self._defaulted(merge_patch(job["spec"], spec))
        if new != job["spec"]:
            job["spec"] = new
            job["metadata"]["generation"] += 1
            self._bump(job)

    def user_delete_job(self, name: str) -> None:
        """`kubectl delete ftj`: the job goes; the garbage collector deletes what it owned (pods gracefully)."""
        job = self.objects.pop(("FineTuneJob", NAMESPACE, name))
        owned = [o for o in self.objects.values() if self._owned_by(o, job["metadata"]["uid"])]
        for pod in [o for o in owned if o["kind"] == "Pod"]:
            self._delete_pod(pod, None)
        # The other objects wait for collect_garbage(): the collector is asynchronous.

    def collect_garbage(self) -> None:
        uids = {obj["metadata"]["uid"] for obj in self.objects.values()}
        for key, obj in list(self.objects.items()):
            refs = obj["metadata"].get("ownerReferences", [])
            if refs and not any(ref["uid"] in uids for ref in refs) and key[0] != "Pod":
                del self.objects[key]

    def job(self, name: str) -> dict[str, Any] | None:
        return self.objects.get(("FineTuneJob", NAMESPACE, name))

    def status(self, name: str) -> dict[str, Any]:
        return (self.job(name) or {}).get("status") or {}

    def condition(self, name: str, type_: str) -> dict[str, Any] | None:
        return next((c for c in self.status(name).get("conditions", []) if c["type"] == type_), None)

    def pods(self, job: str) -> list[dict[str, Any]]:
        found = [o for k, o in self.objects.items() if k[0] == "Pod" and o["metadata"]["labels"].get(LABEL_JOB) == job]
        return sorted(found, key=lambda p: p["metadata"]["name"])

    def pod(self, name: str) -> dict[str, Any]:
        return self.objects[("Pod", NAMESPACE, name)]

    def config_map(self, name: str) -> dict[str, Any] | None:
        return self.objects.get(("ConfigMap", NAMESPACE, name))

    def bind(self, pod_name: str, node: str = "node-1") -> None:
        pod = self.pod(pod_name)
        pod["spec"]["nodeName"] = node
        pod["status"]["conditions"] = [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": rfc3339(self.now)}
        ]
        self._bump(pod)

    def unschedulable(
        self, pod_name: str, message: str = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    ) -> None:
        pod = self.pod(pod_name)
        pod["status"]["conditions"] = [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}
        ]
        self._bump(pod)

    def waiting(self, pod_name: str, reason: str, message: str = "") -> None:
        pod = self.pod(pod_name)
        pod["status"]["containerStatuses"] = [
            {"name": "trainer", "state": {"waiting": {"reason": reason, "message": message}}}
        ]
        self._bump(pod)

    def run(self, pod_name: str) -> None:
        pod = self.pod(pod_name)
        if not pod["spec"].get("nodeName"):
            self.bind(pod_name)
        pod["status"] |= {
            "phase": "Running",
            "containerStatuses": [{"name": "trainer", "state": {"running": {"startedAt": rfc3339(self.now)}}}],
        }
        pod["status"]["conditions"] = [*pod["status"]["conditions"], {"type": "Ready", "status": "True"}]
        self._bump(pod)

    def finish(self, pod_name: str, exit_code: int, reason: str | None = None, message: str = "") -> None:
        pod = self.pod(pod_name)
        if not pod["spec"].get("nodeName"):
            self.bind(pod_name)
        terminated = {
            "exitCode": exit_code,
            "reason": reason or ("Completed" if exit_code == 0 else "Error"),
            "message": message,
            "finishedAt": rfc3339(self.now),
        }
        pod["status"] |= {
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "containerStatuses": [{"name": "trainer", "state": {"terminated": terminated}}],
        }
        self._bump(pod)

    def kubelet_sync(self) -> None:
        """Kubelets confirm the deletion of pods on their nodes, unless a node is lost or a finalizer holds."""
        for key, pod in list(self.objects.items()):
            metadata = pod["metadata"]
            held = metadata.get("finalizers") or pod.get("spec", {}).get("nodeName") in self.lost_nodes
            if key[0] == "Pod" and metadata.get("deletionTimestamp") and not held:
                del self.objects[key]

    def report_progress(self, job: str, report: ProgressReport) -> None:
        cm = self.config_map(PROGRESS_CONFIG_MAP_NAME.format(job=job))
        cm["data"] = {PROGRESS_KEY: report.to_json()}

    def tick(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)

    # --- internals --------------------------------------------------------------------------------------
    def _defaulted(self, spec: dict[str, Any]) -> dict[str, Any]:
        try:
            return FineTuneJobSpec.model_validate(spec).model_dump(mode="json", by_alias=True, exclude_none=True)
        except ValueError:
            return spec  # what the schema lets through but the models refuse is stored as written

    @staticmethod
    def _owned_by(obj: dict[str, Any], uid: str) -> bool:
        return any(ref["uid"] == uid for ref in obj["metadata"].get("ownerReferences", []))

    def _bump(self, obj: dict[str, Any]) -> None:
        obj["metadata"]["resourceVersion"] = str(next(self._versions))

    def _delete_pod(self, pod: dict[str, Any], grace: int | None) -> None:
        metadata = pod["metadata"]
        key = ("Pod", metadata["namespace"], metadata["name"])
        if not pod["spec"].get("nodeName") or (grace == 0 and not metadata.get("finalizers")):
            del self.objects[key]  # never started, or forced: gone at once
            return
        grace = pod["spec"].get("terminationGracePeriodSeconds", 30) if grace is None else grace
        if "deletionTimestamp" not in metadata or grace == 0:
            metadata["deletionTimestamp"] = rfc3339(self.now + timedelta(seconds=grace))
            metadata["deletionGracePeriodSeconds"] = grace
            self._bump(pod)  # a kubelet confirms it at the next kubelet_sync(), unless its node is lost


def _view(pod: dict[str, Any]) -> dict[str, Any]:
    viewed = worker_view(pod)
    assert viewed is not None, "a worker pod carries its job's label"
    return viewed[1]


@dataclass
class Operator:
    """The reconciler driven as handlers.py and the work queue drive it: the job and its pods from the watch
    indices, ghosts filtered, events posted even when acting failed. The job watch delivers the server's
    state before each pass unless a test holds it back (`reconcile(name, deliver=False)`)."""

    fake: FakeKube
    settings: OperatorSettings = field(default_factory=lambda: OperatorSettings(trainer_image="trainer:1"))
    events: list[Event] = field(default_factory=list)
    ghosts: set[str] = field(default_factory=set)
    stale_index: dict[str, dict[str, Any]] = field(default_factory=dict)  # pods the watch missed the deletion of
    errors: list[Exception] = field(default_factory=list)
    watched: dict[str, dict[str, Any]] = field(default_factory=dict)  # the job index: name -> job as last watched
    freshness: Freshness = field(default_factory=Freshness)
    companions: Companions = field(init=False)  # made at once here (the test's kube.when_pods_pause), on fake time
    retries: list[float] = field(default_factory=list)  # the companions' retry(seconds) calls

    def __post_init__(self) -> None:
        self.companions = Companions(clock=lambda: self.fake.now.timestamp())

    def deliver(self, name: str) -> None:
        """The job watch catches up with the server: its latest version, or its deletion."""
        job = self.fake.job(name)
        if job is None:
            if self.watched.pop(name, None) is not None:
                self.freshness.watched((NAMESPACE, name), "DELETED", {"metadata": {}})
            return
        if self.watched.get(name) != job:  # (some tests edit a stored job in place, as a newer version would)
            self.watched[name] = copy.deepcopy(job)
            self.freshness.watched((NAMESPACE, name), "MODIFIED", self.watched[name])

    def index(self, name: str) -> list[dict[str, Any]]:
        pods = {p["metadata"]["name"]: _view(p) for p in self.fake.pods(name)}
        for ghost in self.stale_index.values():
            if ghost["metadata"]["labels"][LABEL_JOB] == name:
                departed = {DEPARTED: True} if ghost.get(DEPARTED) else {}  # as informer keep_deleted marks it
                pods.setdefault(ghost["metadata"]["name"], _view(ghost) | departed)
        return [p for p in pods.values() if p["metadata"]["uid"] not in self.ghosts]

    def progress(self, name: str) -> list[OwnedProgress]:
        cm = self.fake.config_map(PROGRESS_CONFIG_MAP_NAME.format(job=name))
        if cm is None:
            return []
        owner = cm["metadata"]["ownerReferences"][0]["uid"]
        return [OwnedProgress(owner, ProgressReport.from_json((cm.get("data") or {}).get(PROGRESS_KEY)))]

    def reconcile(self, name: str, deliver: bool = True) -> Outcome:
        if deliver:
            self.deliver(name)
        key = (NAMESPACE, name)
        body = self.freshness.current(key, self.watched.get(name))
        outcome = reconcile_job(
            NAMESPACE,
            name,
            self.index(name),
            self.progress(name),
            self.settings,
            now=self.fake.now,
            body=body,
            refused_companions=self.companions.refusals(),
        )
        if outcome.companions_made and outcome.body is not None:
            self.companions.made(outcome.body["metadata"]["uid"])
        self.freshness.passed(key, outcome, self.watched.get(name))
        self.ghosts.update(outcome.ghosts)
        self.events += outcome.events
        if outcome.companions and outcome.body is not None:
            self.companions.make(outcome.body, outcome.companions, self.retries.append)
        if outcome.error is not None:
            self.errors.append(outcome.error)
        return outcome

    def settle(self, name: str, passes: int = 10) -> Outcome:
        """Reconcile until a pass changes nothing (what the watch events would trigger)."""
        for _ in range(passes):
            before = copy.deepcopy(self.fake.objects)
            outcome = self.reconcile(name)
            if self.fake.objects == before and outcome.requeue_after != 0:
                return outcome
        raise AssertionError(f"{name} did not settle in {passes} passes: {self.fake.status(name)}")

    def reasons(self) -> list[str]:
        return [event.reason for event in self.events]
