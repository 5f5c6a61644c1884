"""Leader election (leader.py) with client-go's semantics, against the in-memory API server and against one
that never answers: expiry timed by the observer's own clock, renewals bounded by the renew deadline."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from finetune_operator import kube
from finetune_operator.leader import LeaderElector

from .fake_kube import FakeKube
from .test_kube import SilentServer, silent  # noqa: F401  (the fixture)

WALL = datetime(2026, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeKube:
    api = FakeKube()
    for name in ("get", "create", "replace"):
        monkeypatch.setattr(kube, name, getattr(api, name))
    return api


class Clocks:
    """Each replica's monotonic clock runs at the same pace; the leader's wall clock is `skew` seconds off."""

    def __init__(self) -> None:
        self.now = 1000.0

    def tick(self, seconds: float) -> None:
        self.now += seconds

    def monotonic(self, offset: float = 0.0):
        return lambda: self.now + offset  # another process: another origin, the same pace

    def wall(self, skew: float = 0.0):
        return lambda: WALL + timedelta(seconds=self.now + skew)


def elector(holder: str, clocks: Clocks, offset: float = 0.0, skew: float = 0.0) -> LeaderElector:
    clock, wall_clock = clocks.monotonic(offset), clocks.wall(skew)
    return LeaderElector("ops", "finetune-operator", holder, clock=clock, wall_clock=wall_clock)


def test_a_leader_whose_clock_is_slow_keeps_its_lease_while_it_renews(fake):
    clocks = Clocks()
    leader = elector("a", clocks, skew=-16)  # its renewTime reads 16 s old when written
    standby = elector("b", clocks, offset=-500)
    assert leader.try_acquire_or_renew()
    for _ in range(20):  # 40 s of renewals every retry period
        assert not standby.try_acquire_or_renew() and standby.observed_holder == "a"
        clocks.tick(2)
        assert leader.try_acquire_or_renew()
    assert fake.objects[("Lease", "ops", "finetune-operator")]["spec"]["holderIdentity"] == "a"


def test_a_standby_takes_over_a_lease_it_saw_unchanged_for_its_duration_whatever_its_renew_time(fake):
    clocks = Clocks()
    leader = elector("a", clocks, skew=+3600)  # its renewTime is an hour ahead: it must not last forever
    standby = elector("b", clocks)
    assert leader.try_acquire_or_renew()  # and then the leader dies
    clocks.tick(5)
    assert not standby.try_acquire_or_renew()  # first seen now: the duration counts from here
    clocks.tick(14.9)
    assert not standby.try_acquire_or_renew()
    clocks.tick(0.2)
    assert standby.try_acquire_or_renew()
    spec = fake.objects[("Lease", "ops", "finetune-operator")]["spec"]
    assert (spec["holderIdentity"], spec["leaseTransitions"]) == ("b", 1)


@pytest.mark.parametrize(
    ("lease_duration", "retry_period", "within"),
    # A renewal under way at the deadline (its request may wait a whole 1 s retry period) is given up there too,
    # not when the lease (2 s) expires for a standby: on e72e268, before f0e6522, it ended at 2.0 s.
    [(3, 0.25, 2.0), (2, 1.0, 1.8)],
)
@pytest.mark.usefixtures("silent")
def test_a_leader_facing_a_server_that_never_answers_stops_at_its_renew_deadline(
    monkeypatch, lease_duration, retry_period, within
):
    monkeypatch.setattr(kube, "READ_SECONDS", 30.0)  # the deadline, not the read timeout, must end the attempt
    lost = threading.Event()
    leader = LeaderElector(
        "ops", "lease", "a", lease_duration=lease_duration, renew_deadline=1.5, retry_period=retry_period
    )
    leader.on_lost = lost.set
    leader._renewed_at = time.monotonic()  # as if it had just renewed
    started = time.monotonic()
    leader.keep_renewing()
    assert lost.wait(10), "the renewal loop never gave up"
    took = time.monotonic() - started
    assert 1.4 < took < within  # at the renew deadline, before the lease expires for a standby
    leader._stopped.set()


def test_a_lease_release_is_bounded_too(silent):  # noqa: F811
    leader = LeaderElector("ops", "lease", "a", renew_deadline=1.0)
    leader._renewed_at = time.monotonic()
    started = time.monotonic()
    leader.release()
    assert time.monotonic() - started < 1.5
    assert len(silent.connections) == 1


def test_no_release_after_the_renew_deadline(fake):
    clocks = Clocks()
    leader = elector("a", clocks)
    assert leader.try_acquire_or_renew()
    clocks.tick(leader.renew_deadline)  # a standby may hold it by now: hands off
    leader.release()
    assert fake.objects[("Lease", "ops", "finetune-operator")]["spec"]["holderIdentity"] == "a"
