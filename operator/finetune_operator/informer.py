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

With watch_namespace_selector, `Tenants` follows the namespaces whose labels match it and has each informer
serve a namespace (list and watch it, from a thread of its own) while it matches; a pass for a job runs only
once all three have listed its namespace, as at start-up.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from finetune_operator import kube
from finetune_operator.builders import LABEL_JOB, PROGRESS_CONFIG_MAP_NAME
from finetune_operator.reconciler import OwnedProgress
from finetune_operator.status import DEPARTED
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


def namespace_view(namespace: dict[str, Any]) -> tuple[Key, str]:
    """A namespace, keyed (name, "")."""
    name = namespace["metadata"]["name"]
    return (name, ""), name


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
    thread, for each key whose objects changed; `get` may be called from any thread.

    `start` serves the namespaces given (none: all namespaces); in selector mode it is never called, and `serve`
    and `unserve` add and drop namespaces as their labels come and go."""

    def __init__(
        self,
        kind: str,
        label_selector: str,
        namespaces: list[str],
        view: View,
        changed: Callable[[Key], None],
        keep_deleted: Callable[[dict[str, Any]], bool] = lambda obj: False,
    ) -> None:
        self.kind = kind
        # Deleted objects whose last state a pass must still see (a worker marked by a disruption and deleted
        # before any pass saw the mark): they stay indexed, as the deletion event left them and marked
        # DEPARTED, until the pass that read them forgets them, or the next listing.
        self._keep_deleted = keep_deleted
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
        self._serving: dict[str | None, threading.Event] = {}  # namespace -> the stop of the thread serving it
        self._synced: set[str | None] = set()  # namespaces listed by the thread serving them (None: all)

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

    def keys(self, namespace: str) -> list[Key]:
        with self._lock:
            return [key for key in self._index if key[0] == namespace]

    def start(self) -> None:
        """List each watched namespace (raising when that fails), then keep it current from a thread."""
        stops = {namespace: self._serving.setdefault(namespace, threading.Event()) for namespace in self._namespaces}
        versions = [self.list(namespace, stops[namespace]) for namespace in self._namespaces]
        for namespace, version in zip(self._namespaces, versions, strict=True):
            self._spawn(namespace, version, stops[namespace])

    def serve(self, namespace: str, synced: Callable[[], None], forbidden: Callable[[str], None]) -> None:
        """List and watch `namespace` from a thread of its own, which retries with backoff until it may: `synced()`
        once its first listing is indexed, `forbidden(why)` for each refusal (403). Nothing when served already."""
        with self._lock:
            if namespace in self._serving:
                return
            stop = self._serving[namespace] = threading.Event()
        self._spawn(namespace, None, stop, synced, forbidden)

    def unserve(self, namespace: str) -> None:
        """Serve `namespace` no more: its thread stops, and its objects leave the index without waking their jobs
        (no pass serves them now). A listing or event its thread had under way is dropped."""
        with self._lock:
            stop = self._serving.pop(namespace, None)
            if stop is None:
                return
            stop.set()
            for uid in [uid for uid, key in self._keys.items() if key[0] == namespace]:
                self._remove(uid)
            self._gone = {uid: ns for uid, ns in self._gone.items() if ns != namespace}
            self._synced.discard(namespace)
            self._heard.pop(namespace, None)

    def serves(self, namespace: str) -> bool:
        """Whether this informer has listed `namespace` and keeps it current."""
        return None in self._synced or namespace in self._synced

    def stop(self) -> None:
        with self._lock:
            for stop in self._serving.values():
                stop.set()

    def _spawn(self, namespace: str | None, version: str | None, stop: threading.Event, *callbacks: Any) -> None:
        name = f"watch-{self.kind.lower()}-{namespace or 'all'}"
        threading.Thread(target=self._run, args=(namespace, version, stop, *callbacks), name=name, daemon=True).start()

    def stalled(self, limit: float = STALLED_SECONDS) -> str | None:
        """Why this informer makes no progress (a namespace's watch silent for over `limit` seconds), or None."""
        now = time.monotonic()
        silent = {ns: now - heard for ns, heard in self._heard.copy().items() if now - heard > limit}
        if not silent:
            return None
        namespace, seconds = max(silent.items(), key=lambda item: item[1])
        return f"the {self.kind} watch of {namespace or 'all namespaces'} has heard nothing for {seconds:.0f}s"

    def list(self, namespace: str | None, stop: threading.Event | None = None) -> str:
        """Index a namespace's objects anew (all namespaces: None); the resourceVersion to watch from. Nothing is
        indexed once `stop` (of the thread serving the namespace) is set."""
        stop = stop or threading.Event()
        items, version = kube.list_objects(self.kind, namespace, self._selector)
        listed = {obj["metadata"]["uid"] for obj in items}
        with self._lock:
            if stop.is_set():
                return version
            self._heard[namespace] = time.monotonic()
            vanished = [uid for uid, key in self._keys.items() if namespace in (None, key[0]) and uid not in listed]
            changed = {self._remove(uid) for uid in vanished}
            self._gone = {uid: ns for uid, ns in self._gone.items() if namespace not in (None, ns)}
        for obj in items:
            changed |= self._apply("ADDED", obj, stop)
        with self._lock:
            if not stop.is_set():
                self._synced.add(namespace)
        for key in changed:
            if key is not None:
                self._changed(key)
        return version

    def apply(self, event: dict[str, Any], stop: threading.Event | None = None) -> None:
        """Index one watch event's object, and wake the jobs whose objects it changed."""
        if event["type"] != "BOOKMARK":
            for key in self._apply(event["type"], event["object"], stop):
                if key is not None:
                    self._changed(key)

    def _run(
        self,
        namespace: str | None,
        version: str | None,
        stop: threading.Event,
        synced: Callable[[], None] | None = None,
        forbidden: Callable[[str], None] | None = None,
    ) -> None:
        failures = 0
        while not stop.is_set():
            try:
                if version is None:
                    version = self.list(namespace, stop)
                    if synced is not None and self.serves(namespace or ""):
                        synced()
                        synced = None
                for event in kube.watch(self.kind, namespace, self._selector, version):
                    if stop.is_set():
                        break
                    self._hear(namespace, stop)
                    self.apply(event, stop)
                    version = event["object"]["metadata"]["resourceVersion"]
                self._hear(namespace, stop)
                failures = 0  # the server ended the watch: go on from the last version seen
            except kube.WatchExpired as expired:
                log.info("%s; listing again", expired)
                version = None
            except Exception as error:  # the API server away, a dropped connection: go on after a while
                failures += 1
                delay = FAILURE_BACKOFF_SECONDS[min(failures, len(FAILURE_BACKOFF_SECONDS)) - 1]
                if forbidden is not None and getattr(error, "status", None) == kube.FORBIDDEN:
                    # The API server answered: the watch is not stalled, it waits for the operator's RoleBinding.
                    self._hear(namespace, stop)
                    forbidden(f"{self.kind}s")
                else:
                    where = namespace or "all"
                    log.warning("watching %ss in %s failed: %s; again in %ss", self.kind, where, error, delay)
                stop.wait(delay)

    def _hear(self, namespace: str | None, stop: threading.Event) -> None:
        with self._lock:
            if not stop.is_set():
                self._heard[namespace] = time.monotonic()

    def _apply(self, event_type: str, obj: dict[str, Any], stop: threading.Event | None = None) -> set[Key | None]:
        """Index one event's object; the keys whose objects changed. Nothing once `stop` is set."""
        metadata = obj["metadata"]
        uid, version = metadata["uid"], metadata.get("resourceVersion", "")
        deleted = event_type == "DELETED"
        viewed = self._view(obj) if not deleted or self._keep_deleted(obj) else None
        with self._lock:
            if stop is not None and stop.is_set():
                return set()
            if deleted:
                if self._gone.pop(uid, None) is not None:
                    viewed = None  # the operator found it gone already: nothing left to see
                elif viewed is not None:
                    viewed = (viewed[0], {**viewed[1], DEPARTED: True})
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


class Tenants:
    """watch_namespace_selector: the namespaces whose labels match it, each served by `informers` from when it
    matches until it no longer does or is deleted. `ready(namespace)` is called once all of them have listed it.

    The operator's rights there come from a RoleBinding the namespace's onboarding adds (README): a namespace
    labelled before it has one is retried with backoff, its refusal logged once, and served once allowed."""

    def __init__(self, selector: str, informers: list[Informer], ready: Callable[[str], None]) -> None:
        self.selector = selector
        self.namespaces = Informer("Namespace", selector, [], namespace_view, self._changed)
        self._informers = informers
        self._ready_callback = ready
        self._lock = threading.Lock()
        self._matching: set[str] = set()  # namespaces whose labels match, served or not yet
        self._ready: set[str] = set()  # ... of which all informers have listed
        self._refused: set[str] = set()  # namespaces whose refusal is logged already

    def start(self) -> None:
        """List the matching namespaces (raising when that fails) and start serving each; then follow them."""
        self.namespaces.start()

    def stop(self) -> None:
        self.namespaces.stop()

    def _changed(self, key: Key) -> None:
        namespace = key[0]
        matches = bool(self.namespaces.get(key))
        if not matches:  # first, so that no listing finishing meanwhile marks it ready again
            for informer in self._informers:
                informer.unserve(namespace)
        with self._lock:
            new = matches and namespace not in self._matching
            gone = not matches and namespace in self._matching
            if matches:
                self._matching.add(namespace)
            else:
                self._matching.discard(namespace)
            if gone:
                self._refused.discard(namespace)
                self._ready.discard(namespace)
        if new:
            log.info("namespace %s matches %s: listing its jobs, pods and progress", namespace, self.selector)
        if gone:
            log.info("namespace %s no longer matches %s (or is gone): not serving it", namespace, self.selector)
        for informer in self._informers if matches else []:
            informer.serve(namespace, partial(self._synced, namespace), partial(self._forbidden, namespace))

    def _synced(self, namespace: str) -> None:
        with self._lock:
            if namespace in self._ready or not all(informer.serves(namespace) for informer in self._informers):
                return
            self._ready.add(namespace)
            self._refused.discard(namespace)
        log.info("serving namespace %s", namespace)
        self._ready_callback(namespace)

    def _forbidden(self, namespace: str, why: str) -> None:
        with self._lock:
            if namespace in self._refused:
                return
            self._refused.add(namespace)
        log.warning(
            "namespace %s matches %s, but the operator may not list %s there (403): bind its ClusterRole in it "
            "with a RoleBinding (README: 'Serve namespaces by label'); retrying until it may",
            namespace,
            self.selector,
            why,
        )
