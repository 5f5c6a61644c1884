"""Issue 23's 'Why' bullets that had no test able to fail before their fix. Checked on the commits before:
at 708bd93 (before e72e268) the rejected job deletes the other pod by name; at de7f668 (before c490270) the
shutdown returns at once, the pass cancelled and the companions still held. (The renewal given up at its
deadline is test_leader's.)"""

from __future__ import annotations

import asyncio
import threading

import kopf

from finetune_operator import handlers, kube
from finetune_operator.workqueue import WorkQueue

from .test_kube import silent  # noqa: F401  (the fixture)
from .test_reconciler import fake, operator, reject_creating  # noqa: F401  (the fixtures)


def test_a_rejected_job_deletes_no_pod_of_its_name_that_it_does_not_own(fake, operator, monkeypatch):  # noqa: F811
    # Someone else's pod holds rank 1's name (no job label, no owner): the pass does not see it and its create
    # finds the name taken; rank 0's create is rejected (422), so the job fails and stops the pods it made.
    foreign = {"name": "j-worker-1", "namespace": "ml", "uid": "someone", "labels": {"app": "other"}}
    fake.objects[("Pod", "ml", "j-worker-1")] = {"kind": "Pod", "metadata": foreign, "spec": {}, "status": {}}
    fake.apply_job("j", workers=2)
    reject_creating("j-worker-0", fake, monkeypatch)
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
