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
from datetime import datetime, timezone

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
    """One replica's part in the election for the Lease `namespace`/`name`.

    As client-go's: a lease is expired when this replica has seen no change of it (its resourceVersion) for
    leaseDurationSeconds by its own monotonic clock, never by comparing the holder's renewTime with its own
    wall clock (a holder whose clock is off would lose its lease, or keep an abandoned one). Every attempt is
    bounded by the renew deadline, and a leader that has not renewed by then stops: LEASE_DURATION -
    RENEW_DEADLINE before any standby, which counts from when it saw the last renewal, may take over.
    """

    def __init__(
        self,
        namespace: str,
        name: str,
        holder: str,
        lease_duration: float = LEASE_DURATION,
        renew_deadline: float = RENEW_DEADLINE,
        retry_period: float = RETRY_PERIOD,
        on_lost: Callable[[], None] = _exit_process,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    ) -> None:
        self.namespace, self.name, self.holder = namespace, name, holder
        self.lease_duration, self.renew_deadline, self.retry_period = lease_duration, renew_deadline, retry_period
        self.on_lost = on_lost
        self._clock = clock
        self._wall_clock = wall_clock  # only for the times written into the lease, which nobody times expiry by
        self.observed_holder: str | None = None  # who held the lease at the last attempt
        self._observed_version: str | None = None  # the lease's resourceVersion when it last changed here
        self._observed_at = -float("inf")  # self._clock() when this replica saw that change
        self._renewed_at = -float("inf")  # when this replica's last successful acquire or renewal began
        self._stopped = threading.Event()
        self._renewal: threading.Thread | None = None

    def try_acquire_or_renew(self) -> bool:
        """One attempt: create the lease, renew ours, or take over one released or expired. False when
        another replica holds it or won a race for it (409)."""
        began, wall = self._clock(), self._wall_clock()
        lease = kube.get("Lease", self.namespace, self.name)
        now = self._clock()
        if lease is None:
            created = kube.create(self._lease(wall, wall, transitions=0))
            self.observed_holder = self.holder if created else None
            self._renewed_at = began if created else self._renewed_at
            return created
        spec = lease.get("spec") or {}
        version = lease["metadata"]["resourceVersion"]
        if version != self._observed_version:
            self._observed_version, self._observed_at = version, now
        self.observed_holder = spec.get("holderIdentity") or ""
        ours = self.observed_holder == self.holder
        duration = spec.get("leaseDurationSeconds") or self.lease_duration
        if self.observed_holder and not ours and now < self._observed_at + duration:
            return False
        acquired = _parse(spec["acquireTime"]) if ours and spec.get("acquireTime") else wall
        transitions = (spec.get("leaseTransitions") or 0) + (0 if ours else 1)
        won = kube.replace(self._lease(acquired, wall, transitions, version))
        if won:
            # A success counts from when the attempt began: the server may have written the lease at any moment
            # after that, and a standby times its expiry from when it saw that write.
            self.observed_holder, self._observed_version, self._renewed_at = self.holder, None, began
        return won

    def acquire(self) -> None:
        """Block until this replica holds the lease."""
        reported = None
        while not self._attempt(self.renew_deadline):
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
        """Stop renewing and hand the lease on at once (best effort): a standby need not wait for it to expire.
        Only while still within the renew deadline: past it, a standby may hold the lease already."""
        self._stopped.set()
        if self._renewal is not None:
            self._renewal.join(timeout=self.renew_deadline)  # a renewal under way would make ours a 409
        left = self._renewed_at + self.renew_deadline - self._clock()
        if left <= 0:
            return
        try:
            with kube.deadline(left):
                lease = kube.get("Lease", self.namespace, self.name)
                if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.holder:
                    return
                lease["spec"] |= {"holderIdentity": "", "leaseDurationSeconds": 1}
                if kube.replace(lease):
                    log.info("released lease %s/%s", self.namespace, self.name)
        except Exception as e:  # shutting down: the lease expires by itself anyway
            log.warning("could not release lease %s/%s: %s", self.namespace, self.name, e)

    def _renew_loop(self) -> None:
        while True:
            wait = min(self.retry_period, self._renewed_at + self.renew_deadline - self._clock())
            if self._stopped.wait(max(wait, 0)):
                return
            left = self._renewed_at + self.renew_deadline - self._clock()
            if left > 0 and self._attempt(left):
                continue
            if self._stopped.is_set():
                return
            if (
                self.observed_holder not in (None, self.holder)
                or self._clock() >= self._renewed_at + self.renew_deadline
            ):
                log.error("lost lease %s/%s (holder now: %s)", self.namespace, self.name, self.observed_holder)
                self.on_lost()
                return

    def _attempt(self, seconds: float) -> bool:
        """One attempt, given up after `seconds`."""
        self.observed_holder = None
        try:
            with kube.deadline(seconds):
                return self.try_acquire_or_renew()
        except Exception as e:  # the API server away, a timeout, a 403: all retried within the deadlines
            log.warning("lease %s/%s: %s", self.namespace, self.name, e)
            return False

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
