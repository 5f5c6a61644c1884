"""The dedup work queue: one pass per key at a time, coalesced wakes, delayed wakes, per-key failure backoff."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from finetune_operator.workqueue import FAILURE_BACKOFF_MAX_SECONDS, PassFailed, WorkQueue, failure_backoff

TIMEOUT = 5.0


async def wait_until(probe, timeout: float = TIMEOUT) -> None:
    async def poll():
        while not probe():
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), timeout)


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 20))


def test_keys_woken_before_the_queue_starts_wait_for_it_and_run_once():
    async def scenario():
        passes: list[str] = []

        async def reconcile(key):
            passes.append(key)
            return None

        queue = WorkQueue(reconcile, workers=2)
        for key in ["a", "b", "a"]:
            queue.wake(key)
        await asyncio.sleep(0.05)
        before = list(passes)
        queue.start()
        await wait_until(lambda: len(passes) == 2)
        await queue.close()
        return before, sorted(passes)

    assert run(scenario()) == ([], ["a", "b"])


def test_wakes_while_waiting_coalesce_and_a_wake_during_a_pass_runs_it_once_more():
    async def scenario():
        passes: list[str] = []
        release = asyncio.Event()

        async def reconcile(key):
            passes.append(key)
            if len(passes) == 1:
                await release.wait()
            return None

        queue = WorkQueue(reconcile, workers=4)
        queue.start()
        queue.wake("a")
        await wait_until(lambda: passes == ["a"])
        for _ in range(5):
            queue.wake("a")  # during the pass: one more pass afterwards, not five
        release.set()
        await wait_until(lambda: len(passes) == 2)
        await asyncio.sleep(0.05)
        await queue.close()
        return passes

    assert run(scenario()) == ["a", "a"]


def test_one_key_is_never_reconciled_concurrently():
    async def scenario():
        running, overlaps, done = set(), [], []

        async def reconcile(key):
            if key in running:
                overlaps.append(key)
            running.add(key)
            await asyncio.sleep(0.01)
            running.discard(key)
            done.append(key)
            return None

        queue = WorkQueue(reconcile, workers=8)
        queue.start()
        for _ in range(20):
            queue.wake("a")
            await asyncio.sleep(0.002)
        await wait_until(lambda: not running and done)
        await asyncio.sleep(0.05)
        await queue.close()
        return overlaps, done

    overlaps, done = run(scenario())
    assert overlaps == [] and 2 <= len(done) <= 20


def test_requeue_after_wakes_the_key_later_and_nothing_runs_while_idle():
    async def scenario():
        passes: list[float] = []
        loop = asyncio.get_running_loop()

        async def reconcile(key):
            passes.append(loop.time())
            return 0.1 if len(passes) == 1 else None

        queue = WorkQueue(reconcile, workers=2)
        queue.start()
        queue.wake("a")
        await wait_until(lambda: len(passes) == 2)
        timers = queue.pending_timers()
        await queue.close()
        return passes, timers

    passes, timers = run(scenario())
    assert passes[1] - passes[0] >= 0.09
    assert timers == {}  # idle: no timer left, so no request until a watch event


def test_a_failing_key_backs_off_and_never_delays_the_others(monkeypatch):
    monkeypatch.setattr("finetune_operator.workqueue.FAILURE_BACKOFF_SECONDS", 0.05)

    async def scenario():
        loop = asyncio.get_running_loop()
        failures: list[float] = []
        healthy: list[float] = []

        async def reconcile(key):
            if key == "broken":
                failures.append(loop.time())
                raise RuntimeError("403 Forbidden: exceeded quota")
            healthy.append(loop.time())
            return None

        queue = WorkQueue(reconcile, workers=1)  # one worker: a retry loop would starve the healthy key
        queue.start()
        queue.wake("broken")
        await wait_until(lambda: len(failures) == 4)
        started = loop.time()
        queue.wake("healthy")
        await wait_until(lambda: healthy)
        await queue.close()
        return failures, healthy[0] - started

    failures, healthy_wait = run(scenario())
    gaps = [later - earlier for earlier, later in itertools.pairwise(failures)]
    assert gaps[0] >= 0.045 and gaps[1] >= 0.09 and gaps[2] >= 0.18  # doubling, per key
    assert healthy_wait < 0.2  # the broken key's next retry is 0.4 s away: the healthy one did not wait for it


def test_a_success_resets_the_backoff():
    async def scenario():
        outcomes = iter([RuntimeError("boom"), None, RuntimeError("boom")])
        delays: list[float] = []
        passes: list[str] = []

        async def reconcile(key):
            passes.append(key)
            outcome = next(outcomes, None)
            if isinstance(outcome, Exception):
                raise outcome
            return None

        queue = WorkQueue(reconcile, workers=1)
        queue.start()
        original = queue.wake_after

        def record(key, delay):
            delays.append(delay)
            original(key, 0)  # retry at once: the delay asked for is what is under test

        queue.wake_after = record
        queue.wake("a")
        await wait_until(lambda: len(passes) == 2)  # failed, then succeeded
        queue.wake("a")
        await wait_until(lambda: len(delays) == 2)
        await queue.close()
        return delays

    assert run(scenario()) == [failure_backoff(1), failure_backoff(1)]


@pytest.mark.parametrize(("failures", "expected"), [(1, 1.0), (2, 2.0), (3, 4.0), (20, FAILURE_BACKOFF_MAX_SECONDS)])
def test_failure_backoff_doubles_up_to_its_cap(failures, expected):
    assert failure_backoff(failures) == expected


def test_a_failed_pass_due_sooner_than_its_backoff_runs_when_due():
    async def scenario():
        loop = asyncio.get_running_loop()
        passes: list[float] = []

        async def reconcile(key):
            passes.append(loop.time())
            # a refused create, while the job's deadline is due in 0.1 s: not the backoff's 1 s
            raise PassFailed(RuntimeError("403 quota"), 0.1 if len(passes) == 1 else None)

        queue = WorkQueue(reconcile, workers=1)
        queue.start()
        queue.wake("a")
        await wait_until(lambda: len(passes) == 2)
        await queue.close()
        return passes[1] - passes[0]

    assert 0.1 <= run(scenario()) < failure_backoff(1)


def test_close_takes_no_more_work_and_waits_for_the_passes_under_way():
    async def scenario():
        passes: list[str] = []
        finished: list[str] = []

        async def reconcile(key):
            passes.append(key)
            await asyncio.sleep(0.2)  # the pass's requests
            finished.append(key)
            return None

        queue = WorkQueue(reconcile, workers=2)
        queue.start()
        queue.wake("a")
        await wait_until(lambda: passes == ["a"])
        closing = asyncio.create_task(queue.close(grace=5))
        await asyncio.sleep(0)
        queue.wake("b")  # after SIGTERM: not taken
        await closing
        return passes, finished

    assert run(scenario()) == (["a"], ["a"])


def test_a_pass_that_never_ends_shows_as_stalled():
    async def scenario():
        started = asyncio.Event()

        async def reconcile(key):
            started.set()
            await asyncio.Event().wait()  # wedged

        queue = WorkQueue(reconcile, workers=1)
        queue.start()
        queue.wake("a")
        await started.wait()
        fresh = queue.stalled(limit=0.2)
        await wait_until(lambda: queue.stalled(limit=0.2) is not None)
        problem = queue.stalled(limit=0.2)
        await queue.close()
        return fresh, problem

    fresh, problem = run(scenario())
    assert fresh is None and problem.startswith("the pass of a has run for")
