"""kopf registration: watch events wake a job's key in the work queue; reconciler.py does the work.

kopf watches the jobs, kept as last watched; the pods and progress ConfigMaps come from the operator's own informers
(informer.py), listed before any pass runs. A reconcile costs only its writes: the job is read from the API
server only while its watched copy may be older than the operator's own last write (reconciler.Freshness).
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
from finetune_operator.builders import LABEL_JOB
from finetune_operator.config import OperatorSettings
from finetune_operator.informer import Informer, progress_view, worker_view
from finetune_operator.reconciler import Freshness, reconcile_job
from finetune_operator.workqueue import WorkQueue

log = logging.getLogger(__name__)

# A gang's pods change together (created, scheduled, started, stopped): their events wake the job's pass this
# long after the first of them, one pass for the burst instead of one per pod event. Progress ConfigMap events
# wait as long: the pass that makes a gang makes its ConfigMap first, and a pass woken by that before the new
# pods are watched would find them missing and create them again (409s).
EVENTS_WINDOW_SECONDS = 0.2


class NoDiffBase(kopf.DiffBaseStorage):
    """No diff-base: the operator has no on.create/update/field handlers, yet kopf deep-copies every watched
    object to build one."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    operator_settings = OperatorSettings()
    logging.getLogger().setLevel(operator_settings.log_level.upper())
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)  # one "succeeded" line per watch event
    # Kopf's own progress and diff-base go to annotations; status belongs to the API (status.phase, ...).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="finetune.dev")
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.posting.level = logging.WARNING  # only Warning-level kopf logs become Events; ours are explicit
    # Watches reconnect well before typical load balancer idle timeouts (often 5-10 minutes).
    settings.watching.server_timeout = kube.WATCH_SECONDS
    settings.watching.client_timeout = kube.WATCH_SECONDS + 30
    # The API server may be briefly away (control plane upgrade): retry, don't crash.
    settings.networking.error_backoffs = [1, 2, 5, 10, 20]
    # The chart grants no CRD or namespace reads (least privilege): resources are found once at startup.
    settings.scanning.disabled = True
    executor = ThreadPoolExecutor(max_workers=kube.RECONCILE_THREADS, thread_name_prefix="reconcile")
    loop = asyncio.get_running_loop()
    memo.freshness = Freshness()
    memo.jobs = {}  # (namespace, name) -> the job as last watched

    async def reconcile(key: tuple[str, str]) -> float | None:
        namespace, name = key
        body = memo.freshness.current(key, memo.jobs.get(key))
        with metrics.reconcile_timer():
            outcome = await loop.run_in_executor(
                executor,
                reconcile_job,
                namespace,
                name,
                memo.pods.get(key),
                memo.progress.get(key),
                operator_settings,
                None,
                body,
            )
            memo.freshness.passed(key, outcome, memo.jobs.get(key))
            memo.pods.forget(namespace, outcome.ghosts)
            for event in outcome.events if outcome.body is not None else []:
                # posted even when acting failed: they say what the pass decided
                kube.post_event(outcome.body, event.type, event.reason, event.message)
            metrics.observe_outcome(key, outcome)
            if outcome.error is not None:
                raise outcome.error  # the work queue retries this job with its own backoff
        return outcome.requeue_after

    # A pass mostly waits on the API server: as many passes as threads (and pooled connections) to wait in.
    queue = memo.queue = WorkQueue(reconcile, workers=kube.RECONCILE_THREADS)
    # Listed before any pass runs, so that every pass sees whole gangs; their watch threads wake jobs through
    # the event loop.
    memo.pods = Informer(
        "Pod",
        LABEL_JOB,
        operator_settings.watch_namespaces,
        worker_view,
        lambda key: loop.call_soon_threadsafe(queue.wake_after, key, EVENTS_WINDOW_SECONDS),
    )
    memo.progress = Informer(
        "ConfigMap",
        LABEL_JOB,
        operator_settings.watch_namespaces,
        progress_view,
        lambda key: loop.call_soon_threadsafe(queue.wake_after, key, EVENTS_WINDOW_SECONDS),
    )
    await asyncio.gather(loop.run_in_executor(None, memo.pods.start), loop.run_in_executor(None, memo.progress.start))
    queue.start()  # not before: a pass must never see a gang half-listed


@kopf.on.cleanup()
async def stop_queue(memo: kopf.Memo, **_: Any) -> None:
    memo.pods.stop()
    memo.progress.stop()
    await memo.queue.close()


# One async handler per job event, which also keeps the watched copies: kopf's index would be a second handler
# invocation per event, and a sync handler a thread hand-off.
@kopf.on.event(GROUP, VERSION, PLURAL)
async def finetunejob_event(
    namespace: str, name: str, type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any
) -> None:
    key = (namespace, name)
    if type == "DELETED":
        memo.jobs.pop(key, None)
    else:
        memo.jobs[key] = detached(body)
    memo.freshness.watched(key, type, body)
    memo.queue.wake(key)


def detached(body: kopf.Body) -> dict[str, Any]:
    """A job as watched, detached from kopf's body, without its managedFields (never read)."""
    metadata = {key: value for key, value in body.get("metadata", {}).items() if key != "managedFields"}
    return json.loads(json.dumps({**body, "metadata": metadata}))
