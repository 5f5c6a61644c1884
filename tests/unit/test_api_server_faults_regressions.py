"""Issue 23's 'Why' bullets that had no test able to fail before their fix. Checked on the commits before:
at 708bd93 (before e72e268) the rejected job deletes the other pod by name; at e72e268 (before f0e6522) the
renewal gives up at 2.0 s, when the lease expires; at de7f668 (before c490270) the shutdown returns at once, the
pass cancelled and the companions still held."""

from __future__ import annotations

import asyncio
import threading
import time

import kopf

from finetune_operator import handlers, kube
from finetune_operator.leader import LeaderElector
from finetune_operator.workqueue import WorkQueue

from .test_kube import silent  # noqa: F401  (the fixture)
from .test_reconciler import fake, operator  # noqa: F401  (the fixtures)


def test_a_rejected_job_deletes_no_pod_of_its_name_that_it_does_not_own(fake, operator, monkeypatch):  # noqa: F811
    # Someone else's pod holds rank 1's name (no job label, no owner): the pass does not see it and its create
    # finds the name taken; rank 0's create is rejected (422), so the job fails and stops the pods it made.
    foreign = {"name": "j-worker-1", "namespace": "ml", "uid": "someone", "labels": {"app": "other"}}
    fake.objects[("Pod", "ml", "j-worker-1")] = {"kind": "Pod", "metadata": foreign, "spec": {}, "status": {}}
    fake.apply_job("j", workers=2)
    real_create = fake.create

    def reject_rank_0(obj):
        if obj["metadata"]["name"] == "j-worker-0":
            raise kube.ObjectRejected("Pod j-worker-0: spec.containers[0].resources: Invalid value")
        return real_create(obj)

    monkeypatch.setattr(kube, "create", reject_rank_0)
    operator.reconcile("j")
    assert fake.status("j")["phase"] == "Failed"
    assert fake.pod("j-worker-1")["metadata"]["uid"] == "someone"  # not deleted by name: not the job's


class Informer:
    def stop(self) -> None:
        pass


def test_a_shutdown_returns_only_once_the_pass_and_the_background_work_under_way_are_done():
    # kopf's clean-up on SIGTERM; cli.py releases the Lease as soon as it returns, so nothing may still write then.
    async def scenario() -> tuple[bool, list[str]]:
        done: list[str] = []
        passing, release = asyncio.Event(), threading.Event()

        async def reconcile(key: str) -> None:
            passing.set()
            kube.when_pods_pause(lambda: (release.wait(5), done.append("companions")))  # still being made
            await asyncio.sleep(0.2)  # the pass's requests
            done.append(key)

        queue = WorkQueue(reconcile, workers=1)
        queue.start()
        queue.wake("j")
        await passing.wait()
        memo = kopf.Memo(queue=queue, jobs=Informer(), pods=Informer(), progress=Informer(), tenants=None)
        stopping = asyncio.create_task(handlers.stop_queue(memo))
        await asyncio.wait({stopping}, timeout=1.0)  # a window to see it return too soon: the work is held
        returned_early = stopping.done()
        release.set()
        await stopping
        return returned_early, done

    returned_early, done = asyncio.run(scenario())
    assert not returned_early and sorted(done) == ["companions", "j"]


def test_a_renewal_under_way_at_the_renew_deadline_is_given_up_there(silent, monkeypatch):  # noqa: F811
    # Its one request may wait a whole retry period (1 s) for a server that never answers: an attempt begun
    # 1 s after the last renewal must end at the deadline (1.5 s), not at 2 s, when a standby may take over.
    monkeypatch.setattr(kube, "READ_SECONDS", 30.0)
    lost = threading.Event()
    leader = LeaderElector("ops", "lease", "a", lease_duration=2, renew_deadline=1.5, retry_period=1.0)
    leader.on_lost = lost.set
    leader._renewed_at = time.monotonic()  # as if it had just renewed
    started = time.monotonic()
    leader.keep_renewing()
    assert lost.wait(10), "the renewal loop never gave up"
    assert 1.4 < time.monotonic() - started < 1.8  # stopped acting well before the lease (2 s) expires
    leader._stopped.set()
