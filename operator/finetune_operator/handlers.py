"""kopf registration: watch events wake a job's key in the work queue; reconciler.py does the work.

Jobs, pods and progress ConfigMaps are read from kopf indices (filled from the watch streams, pre-populated
before any handler runs), so a reconcile costs only its writes; the job is read from the API server only
while its watched copy may be older than the operator's own last write (reconciler.Freshness).
"""

from __future__ import annotations

import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf

from finetune_operator import kube, metrics
from finetune_operator.api import GROUP, PLURAL, VERSION
from finetune_operator.builders import LABEL_JOB, PROGRESS_CONFIG_MAP_NAME
from finetune_operator.config import OperatorSettings
from finetune_operator.ghosts import Ghosts
from finetune_operator.reconciler import Freshness, OwnedProgress, reconcile_job
from finetune_operator.workqueue import WorkQueue
from finetune_trainer.contract import PROGRESS_KEY, ProgressReport

log = logging.getLogger(__name__)

JOB_LABELS = {LABEL_JOB: kopf.PRESENT}
# A gang's pods change together (created, scheduled, started, stopped): their events wake the job's pass this
# long after the first of them, one pass for the burst instead of one per pod event.
POD_EVENTS_WINDOW_SECONDS = 0.2


def _is_progress_config_map(name: str, labels: dict[str, str], **_: Any) -> bool:
    return name == PROGRESS_CONFIG_MAP_NAME.format(job=labels.get(LABEL_JOB, ""))


class NoDiffBase(kopf.DiffBaseStorage):
    """No diff-base: the operator has no on.create/update/field handlers, yet kopf deep-copies every watched
    object (each pod and ConfigMap event) to build one, about a seventh of its CPU at 100 jobs."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


@kopf.on.startup()
async def configure(
    settings: kopf.OperatorSettings,
    memo: kopf.Memo,
    jobs: kopf.Index,
    worker_pods: kopf.Index,
    job_progress: kopf.Index,
    **_: Any,
) -> None:
    operator_settings = OperatorSettings()
    logging.getLogger().setLevel(operator_settings.log_level.upper())
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)  # one "succeeded" line per watch event
    # Kopf's own progress and diff-base go to annotations; status belongs to the API (status.phase, ...).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="finetune.dev")
    settings.persistence.diffbase_storage = NoDiffBase()
    # Pods and ConfigMaps filtered by the API server: kopf's label filters alone are applied after it has
    # received and parsed every pod and ConfigMap of the cluster.
    settings.watching.label_selectors["pods"] = LABEL_JOB
    settings.watching.label_selectors["configmaps"] = LABEL_JOB
    settings.posting.level = logging.WARNING  # only Warning-level kopf logs become Events; ours are explicit
    # Watches reconnect well before typical load balancer idle timeouts (often 5-10 minutes).
    settings.watching.server_timeout = 270
    settings.watching.client_timeout = 300
    # The API server may be briefly away (control plane upgrade): retry, don't crash.
    settings.networking.error_backoffs = [1, 2, 5, 10, 20]
    # The chart grants no CRD or namespace reads (least privilege): resources are found once at startup.
    settings.scanning.disabled = True
    if operator_settings.peering:
        settings.peering.name = operator_settings.peering
        settings.peering.standalone = False
    else:
        settings.peering.standalone = True
    executor = ThreadPoolExecutor(max_workers=kube.RECONCILE_THREADS, thread_name_prefix="reconcile")

    memo.ghosts = Ghosts()
    memo.freshness = Freshness()

    async def reconcile(key: tuple[str, str]) -> float | None:
        namespace, name = key
        # A snapshot; each pod is already a detached copy (_worker_view).
        pods = [p for p in worker_pods.get(key, []) if p["metadata"].get("uid") not in memo.ghosts.uids]
        progress = list(job_progress.get(key, []))
        body = memo.freshness.current(key, _watched_job(jobs, key))
        loop = asyncio.get_running_loop()
        with metrics.reconcile_timer():
            outcome = await loop.run_in_executor(
                executor, reconcile_job, namespace, name, pods, progress, operator_settings, None, body
            )
            memo.freshness.passed(key, outcome, _watched_job(jobs, key))
            memo.ghosts.add(outcome.ghosts)
            for event in outcome.events if outcome.body is not None else []:
                # posted even when acting failed: they say what the pass decided
                kopf.event(outcome.body, type=event.type, reason=event.reason, message=event.message)
            metrics.observe_outcome(key, outcome)
            if outcome.error is not None:
                raise outcome.error  # the work queue retries this job with its own backoff
        return outcome.requeue_after

    # A pass mostly waits on the API server: as many passes as threads (and pooled connections) to wait in.
    memo.queue = WorkQueue(reconcile, workers=kube.RECONCILE_THREADS)
    metrics.start_server(operator_settings.metrics_port)


@kopf.on.cleanup()
async def stop_queue(memo: kopf.Memo, **_: Any) -> None:
    await memo.queue.close()


def _watched_job(jobs: kopf.Index, key: tuple[str, str]) -> dict[str, Any] | None:
    return next(iter(jobs.get(key, [])), None)


# The indices are async, though they do no I/O: kopf runs sync handlers in a thread pool, a thread
# hand-off per pod event that cost about a tenth of the operator's CPU when thousands of pods were made.
@kopf.index(GROUP, VERSION, PLURAL)
async def jobs(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict:
    """Each job as last watched, detached from kopf's body, without its managedFields (not read)."""
    metadata = {key: value for key, value in body.get("metadata", {}).items() if key != "managedFields"}
    return {(namespace, name): _plain({**body, "metadata": metadata})}


@kopf.index("pods", labels=JOB_LABELS)
async def worker_pods(namespace: str, labels: dict[str, str], body: kopf.Body, **_: Any) -> dict:
    return {(namespace, labels[LABEL_JOB]): _worker_view(body)}


@kopf.index("configmaps", labels=JOB_LABELS, when=_is_progress_config_map)
async def job_progress(namespace: str, labels: dict[str, str], body: kopf.Body, **_: Any) -> dict:
    controller: dict[str, Any] = next(
        (ref for ref in body.metadata.get("ownerReferences") or [] if ref.get("controller")), {}
    )
    return {(namespace, labels[LABEL_JOB]): OwnedProgress(controller.get("uid"), _parse_progress(body))}


@kopf.on.event(GROUP, VERSION, PLURAL)
async def finetunejob_event(
    namespace: str, name: str, type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any
) -> None:
    memo.freshness.watched((namespace, name), type, body)
    memo.queue.wake((namespace, name))


@kopf.on.event("pods", labels=JOB_LABELS)
async def worker_pod_event(
    namespace: str,
    labels: dict[str, str],
    uid: str,
    type: str | None,
    memo: kopf.Memo,
    worker_pods: kopf.Index,
    **_: Any,
) -> None:
    if memo.ghosts.saw(uid, type, asyncio.get_running_loop().time()):
        _sweep_ghosts_when_quiet(memo, worker_pods)
    memo.queue.wake_after((namespace, labels[LABEL_JOB]), POD_EVENTS_WINDOW_SECONDS)


def _sweep_ghosts_when_quiet(memo: kopf.Memo, worker_pods: kopf.Index) -> None:
    """After a re-listing of the pods: wake the jobs whose indexed pods it did not mention (ghosts.py)."""
    loop = asyncio.get_running_loop()
    wait = memo.ghosts.quiet_in(loop.time())
    if wait > 0:
        loop.call_later(wait, _sweep_ghosts_when_quiet, memo, worker_pods)
        return
    indexed = {pod["metadata"]["uid"]: key for key in list(worker_pods) for pod in worker_pods.get(key, [])}
    for uid in memo.ghosts.sweep(indexed, loop.time()):
        log.info("pod %s of %s/%s is gone since a watch gap; dropped from the index", uid, *indexed[uid])
        memo.queue.wake(indexed[uid])


@kopf.on.event("configmaps", labels=JOB_LABELS, when=_is_progress_config_map)
async def progress_event(namespace: str, labels: dict[str, str], memo: kopf.Memo, **_: Any) -> None:
    memo.queue.wake((namespace, labels[LABEL_JOB]))


def _plain(body: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dict(body)))


def _worker_view(pod: kopf.Body) -> dict[str, Any]:
    """The parts of a worker pod that status.py reads, detached from kopf's body. A whole pod (spec,
    managedFields) costs about 50 KB of Python objects, this about 2 KB: 200 MB against 8 MB at 4,000 pods."""
    metadata = pod.get("metadata", {})
    return _plain(
        {
            "metadata": {
                key: metadata[key]
                for key in (
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
                if key in metadata
            },
            "spec": {"nodeName": pod.get("spec", {}).get("nodeName")},
            "status": pod.get("status", {}),
        }
    )


def _parse_progress(body: kopf.Body) -> ProgressReport | None:
    raw = (body.get("data") or {}).get(PROGRESS_KEY)
    report = ProgressReport.from_json(raw)
    if raw and report is None:
        log.warning(
            "progress ConfigMap %s/%s holds no valid report; ignored", body.metadata.namespace, body.metadata.name
        )
    return report
