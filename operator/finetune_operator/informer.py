"""The operator's own list+watch of its FineTuneJobs, worker pods and progress ConfigMaps, as client-go's
informers do.

They are watched here, not by kopf, because kopf's processing of each event (per-object queueing, body and
patch wrappers, loggers, handler invocation) cost more of the operator's CPU than its reconcile passes did
(bench/RESULTS.md); about thirteen events per job.

An informer keeps an index by job key of a slim view of each object. It is filled by a LIST before the
operator's first pass, so that no pass sees a gang half-indexed (after an operator restart a half-indexed gang
would look failed, and its restart be counted twice), then kept current by a WATCH from the list's
resourceVersion. A watch that cannot resume (410 Gone) lists again, which also drops the objects deleted
during the gap, and wakes the jobs whose objects changed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from finetune_operator import kube
from finetune_operator.builders import LABEL_JOB, PROGRESS_CONFIG_MAP_NAME
from finetune_operator.reconciler import OwnedProgress
from finetune_trainer.contract import PROGRESS_KEY, ProgressReport

log = logging.getLogger(__name__)

Key = tuple[str, str]  # a job's (namespace, name)
View = Callable[[dict[str, Any]], "tuple[Key, Any] | None"]  # an object's job and what to index; None: skip it
FAILURE_BACKOFF_SECONDS = (1, 2, 5, 10, 20)  # between attempts while the API server is away
# A healthy watch hears from the API server at least when it ends (kube.WATCH_SECONDS): silence for twice as
# long as a watch may last means it is wedged, or the API server out of reach, and /healthz says so.
STALLED_SECONDS = 2 * (kube.WATCH_SECONDS + kube.WATCH_READ_SLACK_SECONDS)
POD_FIELDS = (
    "name",
    "namespace",
    "uid",
    "labels",
    "ownerReferences",
    "finalizers",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
)


def job_view(job: dict[str, Any]) -> tuple[Key, dict[str, Any]]:
    """A FineTuneJob as watched, without its managedFields (never read)."""
    metadata = {field: value for field, value in job["metadata"].items() if field != "managedFields"}
    return (metadata["namespace"], metadata["name"]), {**job, "metadata": metadata}


def worker_view(pod: dict[str, Any]) -> tuple[Key, dict[str, Any]] | None:
    """The parts of a worker pod that status.py reads. A whole pod (spec, managedFields) costs about 50 KB of
    Python objects, this about 2 KB: 200 MB against 8 MB at 4,000 pods."""
    metadata = pod["metadata"]
    job = (metadata.get("labels") or {}).get(LABEL_JOB)
    if not job:
        return None
    view = {
        "metadata": {field: metadata[field] for field in POD_FIELDS if field in metadata},
        "spec": {"nodeName": (pod.get("spec") or {}).get("nodeName")},
        "status": pod.get("status") or {},
    }
    return (metadata["namespace"], job), view


def progress_view(config_map: dict[str, Any]) -> tuple[Key, OwnedProgress] | None:
    """A job's progress ConfigMap: its controller's uid and the report in it (None when unreadable)."""
    metadata = config_map["metadata"]
    job = (metadata.get("labels") or {}).get(LABEL_JOB)
    if not job or metadata["name"] != PROGRESS_CONFIG_MAP_NAME.format(job=job):
        return None
    controller: dict[str, Any] = next((r for r in metadata.get("ownerReferences") or [] if r.get("controller")), {})
    raw = (config_map.get("data") or {}).get(PROGRESS_KEY)
    report = ProgressReport.from_json(raw)
    if raw and report is None:
        log.warning("progress ConfigMap %s/%s holds no valid report; ignored", metadata["namespace"], metadata["name"])
    return (metadata["namespace"], job), OwnedProgress(controller.get("uid"), report)


class Informer:
    """An index of one kind's objects with a label, by job key. `changed(key)` is called, from the watch
    thread, for each key whose objects changed; `get` may be called from any thread."""

    def __init__(
        self, kind: str, label_selector: str, namespaces: list[str], view: View, changed: Callable[[Key], None]
    ) -> None:
        self.kind = kind
        self._selector = label_selector
        self._namespaces: list[str | None] = list(namespaces) or [None]  # None: all namespaces
        self._view = view
        self._changed = changed
        self._lock = threading.Lock()
        self._index: dict[Key, dict[str, Any]] = {}  # key -> uid -> view
        self._keys: dict[str, Key] = {}  # uid -> key
        self._versions: dict[str, str] = {}  # uid -> resourceVersion of the indexed view
        self._gone: dict[str, str] = {}  # uid -> namespace: deleted, though no watch event has said so yet
        self._heard: dict[str | None, float] = {}  # namespace -> time.monotonic() of the last list, event or end
        self._stopped = threading.Event()

    def get(self, key: Key) -> list[Any]:
        with self._lock:
            return list(self._index.get(key, {}).values())

    def forget(self, namespace: str, uids: list[str]) -> None:
        """Objects found gone (a delete answered 404) before their watch said so: out of the index now, and
        kept out until the watch catches up."""
        with self._lock:
            for uid in uids:
                self._remove(uid)
                self._gone[uid] = namespace

    def start(self) -> None:
        """List each watched namespace (raising when that fails), then keep it current from a thread."""
        versions = [self.list(namespace) for namespace in self._namespaces]
        for namespace, version in zip(self._namespaces, versions, strict=True):
            name = f"watch-{self.kind.lower()}-{namespace or 'all'}"
            threading.Thread(target=self._run, args=(namespace, version), name=name, daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()

    def stalled(self, limit: float = STALLED_SECONDS) -> str | None:
        """Why this informer makes no progress (a namespace's watch silent for over `limit` seconds), or None."""
        now = time.monotonic()
        silent = {ns: now - heard for ns, heard in self._heard.copy().items() if now - heard > limit}
        if not silent:
            return None
        namespace, seconds = max(silent.items(), key=lambda item: item[1])
        return f"the {self.kind} watch of {namespace or 'all namespaces'} has heard nothing for {seconds:.0f}s"

    def list(self, namespace: str | None) -> str:
        """Index a namespace's objects anew (all namespaces: None); the resourceVersion to watch from."""
        items, version = kube.list_objects(self.kind, namespace, self._selector)
        self._heard[namespace] = time.monotonic()
        listed = {obj["metadata"]["uid"] for obj in items}
        with self._lock:
            vanished = [uid for uid, key in self._keys.items() if namespace in (None, key[0]) and uid not in listed]
            changed = {self._remove(uid) for uid in vanished}
            self._gone = {uid: ns for uid, ns in self._gone.items() if namespace not in (None, ns)}
        for obj in items:
            changed |= self._apply("ADDED", obj)
        for key in changed:
            if key is not None:
                self._changed(key)
        return version

    def apply(self, event: dict[str, Any]) -> None:
        """Index one watch event's object, and wake the jobs whose objects it changed."""
        if event["type"] != "BOOKMARK":
            for key in self._apply(event["type"], event["object"]):
                if key is not None:
                    self._changed(key)

    def _run(self, namespace: str | None, version: str | None) -> None:
        failures = 0
        while not self._stopped.is_set():
            try:
                if version is None:
                    version = self.list(namespace)
                for event in kube.watch(self.kind, namespace, self._selector, version):
                    self._heard[namespace] = time.monotonic()
                    self.apply(event)
                    version = event["object"]["metadata"]["resourceVersion"]
                self._heard[namespace] = time.monotonic()
                failures = 0  # the server ended the watch: go on from the last version seen
            except kube.WatchExpired as expired:
                log.info("%s; listing again", expired)
                version = None
            except Exception as error:  # the API server away, a dropped connection: go on after a while
                failures += 1
                delay = FAILURE_BACKOFF_SECONDS[min(failures, len(FAILURE_BACKOFF_SECONDS)) - 1]
                log.warning("watching %ss in %s failed: %s; again in %ss", self.kind, namespace or "all", error, delay)
                self._stopped.wait(delay)

    def _apply(self, event_type: str, obj: dict[str, Any]) -> set[Key | None]:
        """Index one event's object; the keys whose objects changed."""
        metadata = obj["metadata"]
        uid, version = metadata["uid"], metadata.get("resourceVersion", "")
        viewed = self._view(obj) if event_type != "DELETED" else None
        with self._lock:
            if event_type == "DELETED":
                self._gone.pop(uid, None)
            elif uid in self._gone or self._versions.get(uid) == version:
                return set()  # a late event about a pod found gone, or nothing new
            old = self._remove(uid)
            if viewed is not None:
                key, value = viewed
                self._index.setdefault(key, {})[uid] = value
                self._keys[uid] = key
                self._versions[uid] = version
            return {old, viewed[0] if viewed else None}

    def _remove(self, uid: str) -> Key | None:
        key = self._keys.pop(uid, None)
        self._versions.pop(uid, None)
        if key is not None:
            objects = self._index[key]
            objects.pop(uid, None)
            if not objects:
                del self._index[key]
        return key
