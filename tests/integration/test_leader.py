"""Lease leader election (finetune_operator.leader) against the embedded API server, with short durations."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from finetune_dev.harness import wait_for
from finetune_operator import kube as operator_kube
from finetune_operator.leader import LeaderElector

pytestmark = pytest.mark.integration

LEASE = "finetune-operator"
MICRO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
FAST = {"lease_duration": 2, "renew_deadline": 1.5, "retry_period": 0.25}


@pytest.fixture
def electors(kube: Any, namespace: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[LeaderElector]]:
    """Contenders made by `contender`, talking to the test cluster through the operator's own kube.py;
    stopped afterwards so that no renewal thread outlives the test."""
    client = kube.api_client()
    monkeypatch.setattr(operator_kube, "api_client", lambda: client)
    made: list[LeaderElector] = []
    yield made
    for elector in made:
        elector._stopped.set()


def contender(electors: list[LeaderElector], namespace: str, holder: str, **options: Any) -> LeaderElector:
    elector = LeaderElector(namespace, LEASE, holder, **{**FAST, **options})
    electors.append(elector)
    return elector


def lease_spec(namespace: str) -> dict:
    lease = operator_kube.get("Lease", namespace, LEASE)
    assert lease is not None
    return lease["spec"]


def test_the_first_contender_creates_the_lease(electors, namespace):
    a = contender(electors, namespace, "a")
    assert a.try_acquire_or_renew()
    spec = lease_spec(namespace)
    assert (spec["holderIdentity"], spec["leaseDurationSeconds"], spec["leaseTransitions"]) == ("a", 2, 0)
    assert MICRO_TIME.match(spec["acquireTime"]) and MICRO_TIME.match(spec["renewTime"])
    assert a.try_acquire_or_renew()  # a renewal: the same holder and acquireTime, a later renewTime
    renewed = lease_spec(namespace)
    assert (renewed["holderIdentity"], renewed["acquireTime"], renewed["leaseTransitions"]) == (
        "a",
        spec["acquireTime"],
        0,
    )
    assert renewed["renewTime"] > spec["renewTime"]


def test_no_one_else_acquires_while_the_leader_renews(electors, namespace):
    lost = threading.Event()
    a = contender(electors, namespace, "a", on_lost=lost.set)
    a.acquire()
    a.keep_renewing()
    b = contender(electors, namespace, "b")
    deadline = time.monotonic() + 2 * FAST["lease_duration"]  # well past the lease duration
    while time.monotonic() < deadline:
        assert not b.try_acquire_or_renew()
        assert b.observed_holder == "a"
    assert not lost.is_set()
    assert lease_spec(namespace)["holderIdentity"] == "a"


def test_an_expired_lease_is_taken_over_and_counts_a_transition(electors, namespace):
    a, b = contender(electors, namespace, "a"), contender(electors, namespace, "b")
    assert a.try_acquire_or_renew()  # and never renewed: a died
    acquired = time.monotonic()
    assert not b.try_acquire_or_renew()
    wait_for(b.try_acquire_or_renew, 10, what="b to take the expired lease over")
    assert time.monotonic() - acquired >= FAST["lease_duration"] - 0.5  # not before it expired (clock grain)
    spec = lease_spec(namespace)
    assert (spec["holderIdentity"], spec["leaseTransitions"]) == ("b", 1)
    assert not a.try_acquire_or_renew() and a.observed_holder == "b"


def test_a_released_lease_is_taken_at_once(electors, namespace):
    a, b = contender(electors, namespace, "a", lease_duration=60), contender(electors, namespace, "b")
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    b.release()  # not the holder: changes nothing
    assert lease_spec(namespace)["holderIdentity"] == "a"
    a.release()
    assert lease_spec(namespace)["holderIdentity"] == ""
    assert b.try_acquire_or_renew()
    spec = lease_spec(namespace)
    assert (spec["holderIdentity"], spec["leaseDurationSeconds"], spec["leaseTransitions"]) == ("b", 2, 1)


def test_of_two_racing_for_an_expired_lease_exactly_one_wins(electors, namespace, monkeypatch):
    a = contender(electors, namespace, "a")
    assert a.try_acquire_or_renew()
    b, c = contender(electors, namespace, "b"), contender(electors, namespace, "c")
    read_together = threading.Barrier(2, timeout=10)
    real_get = operator_kube.get

    def get_then_wait_for_the_other(*args, **kwargs):
        lease = real_get(*args, **kwargs)
        read_together.wait()  # both read the same resourceVersion: one PUT must get a 409
        return lease

    assert not b.try_acquire_or_renew() and not c.try_acquire_or_renew()  # each times expiry from here
    seen = time.monotonic()
    wait_for(lambda: time.monotonic() - seen > FAST["lease_duration"], 10, what="a's lease to expire")
    monkeypatch.setattr(operator_kube, "get", get_then_wait_for_the_other)
    results: dict[str, bool] = {}
    racers = [threading.Thread(target=lambda e=e: results.update({e.holder: e.try_acquire_or_renew()})) for e in (b, c)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(timeout=30)
    monkeypatch.setattr(operator_kube, "get", real_get)
    assert sorted(results.values()) == [False, True], results
    winner = next(holder for holder, won in results.items() if won)
    spec = lease_spec(namespace)
    assert (spec["holderIdentity"], spec["leaseTransitions"]) == (winner, 1)


def test_a_leader_that_loses_its_lease_gives_up(electors, namespace):
    lost = threading.Event()
    a = contender(electors, namespace, "a", on_lost=lost.set)
    a.acquire()
    a.keep_renewing()

    def take_it() -> bool:  # a 409 when a renewal came in between: read again
        lease = operator_kube.get("Lease", namespace, LEASE)
        assert lease is not None
        lease["spec"] |= {"holderIdentity": "intruder", "leaseDurationSeconds": 3600}
        return operator_kube.replace(lease)

    wait_for(take_it, 10, what="the intruder to take the lease")
    assert lost.wait(10), "the renewal loop did not notice that another holder took the lease"


def test_a_leader_that_cannot_renew_gives_up_before_its_lease_expires(electors, namespace, monkeypatch):
    lost = threading.Event()
    a = contender(electors, namespace, "a", on_lost=lost.set)
    a.acquire()
    a.keep_renewing()
    renewed = lease_spec(namespace)["renewTime"]
    wait_for(lambda: lease_spec(namespace)["renewTime"] != renewed, 10, what="a renewal")

    def unreachable(*_args: Any, **_kwargs: Any) -> None:
        raise ConnectionError("the API server is away")

    monkeypatch.setattr(operator_kube, "get", unreachable)
    cut_off = time.monotonic()
    assert lost.wait(10), "the renewal loop kept going without the lease"
    # Gone within the renew deadline (plus one retry period), before any standby may take over.
    assert FAST["renew_deadline"] - FAST["retry_period"] <= time.monotonic() - cut_off < FAST["lease_duration"]
