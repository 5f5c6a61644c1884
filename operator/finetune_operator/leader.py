"""Leader election with a coordination.k8s.io/v1 Lease, as client-go's leaderelection does it: of the
replicas of the operator only the lease's holder runs at all; the others wait until it lets go or expires."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

from finetune_operator import kube

log = logging.getLogger(__name__)

# client-go's (and controller-runtime's) defaults. A leader that cannot renew within RENEW_DEADLINE stops,
# LEASE_DURATION - RENEW_DEADLINE before any standby may take its lease over.
LEASE_DURATION = 15.0
RENEW_DEADLINE = 10.0
RETRY_PERIOD = 2.0
MICRO_TIME = "%Y-%m-%dT%H:%M:%S.%fZ"  # metav1.MicroTime


def identity() -> str:
    """This replica's name in the lease: its pod's name, as the chart passes it."""
    return os.environ.get("POD_ID") or os.environ.get("HOSTNAME") or f"{socket.gethostname()}-{secrets.token_hex(3)}"


def _exit_process() -> None:
    log.error("leader election lost: exiting, never to reconcile without the lease")
    os._exit(1)  # at once, as controller-runtime does: kopf's threads must not run on; the pod restarts


class LeaderElector:
    """One replica's part in the election for the Lease `namespace`/`name`."""

    def __init__(
        self,
        namespace: str,
        name: str,
        holder: str,
        lease_duration: float = LEASE_DURATION,
        renew_deadline: float = RENEW_DEADLINE,
        retry_period: float = RETRY_PERIOD,
        on_lost: Callable[[], None] = _exit_process,
    ) -> None:
        self.namespace, self.name, self.holder = namespace, name, holder
        self.lease_duration, self.renew_deadline, self.retry_period = lease_duration, renew_deadline, retry_period
        self.on_lost = on_lost
        self.observed_holder: str | None = None  # who held the lease at the last attempt
        self._stopped = threading.Event()
        self._renewal: threading.Thread | None = None

    def try_acquire_or_renew(self) -> bool:
        """One attempt: create the lease, renew ours, or take over one released or expired. False when
        another replica holds it or won a race for it (409)."""
        now = datetime.now(timezone.utc)
        lease = kube.get("Lease", self.namespace, self.name, timeout=self.retry_period)
        if lease is None:
            created = kube.create(self._lease(now, now, transitions=0), timeout=self.retry_period)
            self.observed_holder = self.holder if created else None
            return created
        spec = lease.get("spec") or {}
        self.observed_holder = spec.get("holderIdentity") or ""
        ours = self.observed_holder == self.holder
        if self.observed_holder and not ours and not self._expired(spec, now):
            return False
        acquired = _parse(spec["acquireTime"]) if ours and spec.get("acquireTime") else now
        transitions = (spec.get("leaseTransitions") or 0) + (0 if ours else 1)
        renewed = self._lease(acquired, now, transitions, lease["metadata"]["resourceVersion"])
        won = kube.replace(renewed, timeout=self.retry_period)
        self.observed_holder = self.holder if won else self.observed_holder
        return won

    def acquire(self) -> None:
        """Block until this replica holds the lease."""
        reported = None
        while not self._attempt():
            if self.observed_holder not in (None, reported):
                reported = self.observed_holder
                log.info("waiting to lead: lease %s/%s is held by %s", self.namespace, self.name, reported)
            self._stopped.wait(self.retry_period)
        log.info("leading: acquired lease %s/%s as %s", self.namespace, self.name, self.holder)

    def keep_renewing(self) -> None:
        """Renew every retry period; `on_lost` when none passed within the renew deadline or another holds it."""
        self._renewal = threading.Thread(target=self._renew_loop, name="lease-renewal", daemon=True)
        self._renewal.start()

    def release(self) -> None:
        """Stop renewing and hand the lease on at once (best effort): a standby need not wait for it to expire."""
        self._stopped.set()
        if self._renewal is not None:
            self._renewal.join(timeout=2 * self.retry_period)  # a renewal under way would make ours a 409
        try:
            lease = kube.get("Lease", self.namespace, self.name, timeout=self.retry_period)
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.holder:
                return
            lease["spec"] |= {"holderIdentity": "", "leaseDurationSeconds": 1}
            if kube.replace(lease, timeout=self.retry_period):
                log.info("released lease %s/%s", self.namespace, self.name)
        except Exception as e:  # shutting down: the lease expires by itself anyway
            log.warning("could not release lease %s/%s: %s", self.namespace, self.name, e)

    def _renew_loop(self) -> None:
        renewed = time.monotonic()
        while not self._stopped.wait(self.retry_period):
            if self._attempt():
                renewed = time.monotonic()
            elif self._stopped.is_set():
                return
            elif self.observed_holder not in (None, self.holder) or time.monotonic() - renewed > self.renew_deadline:
                log.error("lost lease %s/%s (holder now: %s)", self.namespace, self.name, self.observed_holder)
                self.on_lost()
                return

    def _attempt(self) -> bool:
        self.observed_holder = None
        try:
            return self.try_acquire_or_renew()
        except Exception as e:  # the API server away, a timeout, a 403: all retried within the deadlines
            log.warning("lease %s/%s: %s", self.namespace, self.name, e)
            return False

    def _expired(self, spec: dict[str, Any], now: datetime) -> bool:
        renewed, duration = spec.get("renewTime") or spec.get("acquireTime"), spec.get("leaseDurationSeconds")
        return renewed is None or _parse(renewed) + timedelta(seconds=duration or self.lease_duration) < now

    def _lease(self, acquired: datetime, now: datetime, transitions: int, version: str | None = None) -> dict:
        metadata = {"name": self.name, "namespace": self.namespace} | ({"resourceVersion": version} if version else {})
        spec = {
            "holderIdentity": self.holder,
            "leaseDurationSeconds": max(1, round(self.lease_duration)),
            "acquireTime": acquired.strftime(MICRO_TIME),
            "renewTime": now.strftime(MICRO_TIME),
            "leaseTransitions": transitions,
        }
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata, "spec": spec}


def _parse(micro_time: str) -> datetime:  # a MicroTime, or a Time (no fraction) that another client wrote
    return datetime.fromisoformat(micro_time.replace("Z", "+00:00"))
