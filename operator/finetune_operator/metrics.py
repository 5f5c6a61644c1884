"""Prometheus metrics of the operator, named and labelled as Kubeflow's training operator counts jobs."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

from finetune_operator.status import parse_time

if TYPE_CHECKING:
    from finetune_operator.reconciler import Outcome

JOBS_CREATED = Counter("finetune_jobs_created_total", "FineTuneJobs whose first gang was created.", ["namespace"])
JOBS_SUCCEEDED = Counter("finetune_jobs_succeeded_total", "FineTuneJobs that succeeded.", ["namespace"])
JOBS_FAILED = Counter("finetune_jobs_failed_total", "FineTuneJobs that failed.", ["namespace", "reason"])
JOBS_RESTARTED = Counter("finetune_jobs_restarted_total", "Gang restarts.", ["namespace", "reason"])
STEPS_LOST = Counter("finetune_steps_lost_total", "Training steps redone because of failures.", ["namespace"])
TIME_TO_RUNNING = Histogram(
    "finetune_job_time_to_running_seconds",
    "From the job's creation to all workers of its first attempt running.",
    buckets=(1, 2, 5, 10, 30, 60, 120, 300, 600, 1800),
)
RECONCILE_SECONDS = Histogram("finetune_reconcile_duration_seconds", "Time of one reconcile pass.")
RECONCILE_ERRORS = Counter("finetune_reconcile_errors_total", "Reconcile passes that raised.")


class JobsByPhase:
    """finetune_jobs{namespace, phase}: counted at scrape time from each job's last reconciled phase."""

    def __init__(self) -> None:
        self.phases: dict[tuple[str, str], str] = {}

    def collect(self):
        family = GaugeMetricFamily(
            "finetune_jobs", "FineTuneJobs by phase, as last reconciled.", labels=["namespace", "phase"]
        )
        counts: dict[tuple[str, str], int] = {}
        for (namespace, _), phase in list(self.phases.items()):
            counts[(namespace, phase)] = counts.get((namespace, phase), 0) + 1
        for (namespace, phase), count in sorted(counts.items()):
            family.add_metric([namespace, phase], count)
        yield family


JOBS_BY_PHASE = JobsByPhase()
REGISTRY.register(JOBS_BY_PHASE)


class Liveness:
    """What /healthz answers: the parts of the operator that make no progress (a pass that never ends, a watch
    that hears nothing), each named; none is healthy. A standby has none to check."""

    def __init__(self) -> None:
        self._checks: list[Callable[[], str | None]] = []

    def add(self, check: Callable[[], str | None]) -> None:
        """check(): why its part is stuck, or None."""
        self._checks.append(check)

    def problems(self) -> list[str]:
        return [problem for check in list(self._checks) if (problem := check()) is not None]


LIVENESS = Liveness()


def start_server(port: int) -> None:
    if port:
        start_http_server(port)


@contextmanager
def reconcile_timer() -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    except Exception:
        RECONCILE_ERRORS.inc()
        raise
    finally:
        RECONCILE_SECONDS.observe(time.perf_counter() - started)


def observe_outcome(key: tuple[str, str], outcome: Outcome) -> None:
    """Count the transitions one reconcile pass made."""
    if outcome.body is None:
        JOBS_BY_PHASE.phases.pop(key, None)
        return
    old = outcome.body.get("status") or {}
    new = outcome.status if outcome.status is not None else old
    if new.get("phase"):
        JOBS_BY_PHASE.phases[key] = new["phase"]
    if outcome.status is None:
        return
    metadata = outcome.body["metadata"]
    namespace = metadata["namespace"]
    before, after = old.get("phase"), new.get("phase")
    if before is None and after:
        JOBS_CREATED.labels(namespace).inc()
    if after == "Succeeded" and before != after:
        JOBS_SUCCEEDED.labels(namespace).inc()
    if after == "Failed" and before != after:
        failed = [c for c in new.get("conditions", []) if c["type"] == "Failed"]
        JOBS_FAILED.labels(namespace, failed[0]["reason"] if failed else "Unknown").inc()
    if new.get("restarts", 0) > old.get("restarts", 0):
        reason = (new.get("restartHistory") or [{}])[-1].get("reason", "Unknown")
        JOBS_RESTARTED.labels(namespace, reason).inc()
        STEPS_LOST.labels(namespace).inc(new.get("stepsLost", 0) - old.get("stepsLost", 0))
    if after == "Running" and before != after and not new.get("restarts"):
        created = metadata.get("creationTimestamp")
        if created:
            TIME_TO_RUNNING.observe(time.time() - parse_time(created).timestamp())
