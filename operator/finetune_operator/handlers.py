"""kopf registration: the operator's start-up and clean-up; watch events wake a job's key in the work queue,
and reconciler.py does the work.

kopf runs the operator (start-up and clean-up, signals) but watches nothing (/healthz is cli.py's): the jobs,
their pods and progress ConfigMaps come from the operator's own informers (informer.py), all listed before
any pass runs, at a fraction of kopf's CPU per event. A reconcile costs only its writes: the job is read from
the API server only while its watched copy may be older than the operator's own last write
(reconciler.Freshness).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import kopf

from finetune_operator import kube, metrics
from finetune_operator.builders import LABEL_JOB
from finetune_operator.config import OperatorSettings
from finetune_operator.informer import Informer, Tenants, job_view, progress_view, worker_view
from finetune_operator.reconciler import PASS_SECONDS, Companions, Expectations, Freshness, reconcile_job
from finetune_operator.status import taken_by_disruption
from finetune_operator.workqueue import PassFailed, WorkQueue

log = logging.getLogger(__name__)

# A gang's pods change together (created, scheduled, started, stopped): their events wake the job's pass this
# long after the first of them, one pass for the burst instead of one per pod event. Progress ConfigMap events
# wait as long: the pass that makes a gang makes its ConfigMap first, and a pass woken by that before the new
# pods are watched would find them missing and create them again (409s).
EVENTS_WINDOW_SECONDS = 0.2
# On SIGTERM the passes, Events and companion objects under way finish before the Lease goes to another replica,
# within this: inside the pod's default 30 s grace period, with time left to release the Lease.
SHUTDOWN_SECONDS = 20.0


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    operator_settings = OperatorSettings()
    logging.getLogger().setLevel(operator_settings.log_level.upper())
    # The chart grants no CRD reads (least privilege; namespace reads only with watchNamespaceSelector, for
    # informer.Tenants), and kopf watches nothing here anyway.
    settings.scanning.disabled = True
    executor = ThreadPoolExecutor(max_workers=kube.RECONCILE_THREADS, thread_name_prefix="reconcile")
    loop = asyncio.get_running_loop()
    memo.freshness = Freshness()
    memo.expectations = Expectations()
    memo.companions = Companions()

    async def reconcile(key: tuple[str, str]) -> float | None:
        namespace, name = key
        if not all(informer.serves(namespace) for informer in informers):
            return None  # a namespace not (or no longer, or not yet wholly) listed; woken once it is
        if memo.expectations.unmet(key, memo.pods.get(key), loop.time()):
            return EVENTS_WINDOW_SECONDS  # the pod events wake it as well
        body = memo.freshness.current(key, watched_job(key))
        refusals = memo.companions.refusals()
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
                refusals,
            )
            memo.freshness.passed(key, outcome, watched_job(key))
            memo.pods.forget(namespace, outcome.ghosts)
            memo.expectations.created(key, outcome.created, loop.time())
            for event in outcome.events if outcome.body is not None else []:
                # posted even when acting failed: they say what the pass decided
                kube.post_event(outcome.body, event.type, event.reason, event.message)
            if outcome.companions and outcome.body is not None:
                memo.companions.make(outcome.body, outcome.companions, partial(retry_companions, key))
            if outcome.companions_made and outcome.body is not None:
                memo.companions.made(outcome.body["metadata"]["uid"])  # the pass made them itself
            metrics.observe_outcome(key, outcome)
            if outcome.error is not None:
                # retried with the job's own backoff, or sooner when the pass's decision is due (a deadline)
                raise PassFailed(outcome.error, outcome.requeue_after)
        return outcome.requeue_after

    def retry_companions(key: tuple[str, str], seconds: float) -> None:
        loop.call_soon_threadsafe(queue.wake_after, key, seconds)

    def watched_job(key: tuple[str, str]) -> dict[str, Any] | None:
        return next(iter(memo.jobs.get(key)), None)

    def wake_namespace(namespace: str) -> None:
        for key in memo.jobs.keys(namespace):
            queue.wake(key)

    def job_event(key: tuple[str, str]) -> None:
        """Runs in the event loop; the job as watched then (a version skipped this way costs a GET, no more)."""
        job = watched_job(key)
        memo.freshness.watched(key, "MODIFIED" if job else "DELETED", job or {"metadata": {}})
        queue.wake(key)

    # A pass mostly waits on the API server: as many passes as threads (and pooled connections) to wait in.
    queue = memo.queue = WorkQueue(reconcile, workers=kube.RECONCILE_THREADS)
    # Listed before any pass runs, so that every pass sees whole gangs; their watch threads wake jobs through
    # the event loop.
    memo.jobs = Informer(
        "FineTuneJob",
        "",
        operator_settings.watch_namespaces,
        job_view,
        lambda key: loop.call_soon_threadsafe(job_event, key),
    )
    memo.pods = Informer(
        "Pod",
        LABEL_JOB,
        operator_settings.watch_namespaces,
        worker_view,
        lambda key: loop.call_soon_threadsafe(queue.wake_after, key, EVENTS_WINDOW_SECONDS),
        keep_deleted=taken_by_disruption,
    )
    memo.progress = Informer(
        "ConfigMap",
        LABEL_JOB,
        operator_settings.watch_namespaces,
        progress_view,
        lambda key: loop.call_soon_threadsafe(queue.wake_after, key, EVENTS_WINDOW_SECONDS),
    )
    informers = (memo.jobs, memo.pods, memo.progress)
    memo.tenants = None
    if operator_settings.watch_namespace_selector:
        # Each matching namespace is listed by its informers' own threads, retried while forbidden; its jobs are
        # woken once all three have it (the gate at the top of reconcile keeps passes off it until then).
        memo.tenants = Tenants(
            operator_settings.watch_namespace_selector,
            list(informers),
            lambda namespace: loop.call_soon_threadsafe(wake_namespace, namespace),
        )
        await loop.run_in_executor(None, memo.tenants.start)
    else:
        await asyncio.gather(*(loop.run_in_executor(None, informer.start) for informer in informers))
    queue.start()  # not before: a pass must never see a gang half-listed
    # /healthz turns red when passes or watches make no progress, so Kubernetes restarts a wedged operator.
    metrics.LIVENESS.add(partial(queue.stalled, 2 * PASS_SECONDS))
    for informer in (*informers, *([memo.tenants.namespaces] if memo.tenants else [])):
        metrics.LIVENESS.add(informer.stalled)


@kopf.on.cleanup()
async def stop_queue(memo: kopf.Memo, **_: Any) -> None:
    """On SIGTERM: take no more work, and let what is under way finish (the caller releases the Lease then)."""
    loop = asyncio.get_running_loop()
    until = loop.time() + SHUTDOWN_SECONDS
    if memo.tenants is not None:
        memo.tenants.stop()
    for informer in (memo.jobs, memo.pods, memo.progress):
        informer.stop()
    await memo.queue.close(grace=SHUTDOWN_SECONDS)
    if not await loop.run_in_executor(None, kube.background.wait_idle, until - loop.time()):
        log.warning("stopping with Events or companion objects not made yet; the next leader makes them")
