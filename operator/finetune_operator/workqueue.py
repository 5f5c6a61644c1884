"""A deduplicating work queue of job keys, as controller-runtime has: one reconcile per key at a time.

Watch events only wake a key; many wakes while it waits coalesce into one pass, a wake during a pass
runs it once more afterwards, and delayed wakes (backoff, deadlines, TTL) use the event loop's timers.
A pass that raises is retried after that key's own growing delay (reset by a pass that does not raise),
so a failing job costs a few requests and never delays the others.
No finalizers, no polling: state lives in the API server, so a lost wake-up costs nothing after a restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

Key = TypeVar("Key", bound=Hashable)  # a job's (namespace, name)
FAILURE_BACKOFF_SECONDS = 1.0
FAILURE_BACKOFF_MAX_SECONDS = 300.0


class PassFailed(Exception):
    """A pass that failed after deciding when the key is due again anyway (a deadline, a TTL): it is retried
    after the sooner of that and its failure backoff."""

    def __init__(self, error: Exception, requeue_after: float | None) -> None:
        super().__init__(str(error))
        self.error, self.requeue_after = error, requeue_after


def failure_backoff(failures: int) -> float:
    """Seconds before retrying a key after its `failures`-th failure in a row (1-based): doubling, capped."""
    return min(FAILURE_BACKOFF_SECONDS * 2 ** (failures - 1), FAILURE_BACKOFF_MAX_SECONDS)


class WorkQueue(Generic[Key]):
    def __init__(self, reconcile: Callable[[Key], Awaitable[float | None]], workers: int) -> None:
        # reconcile(key) returns seconds until the key's next pass, if any
        self._reconcile = reconcile
        self._queue: asyncio.Queue[Key] = asyncio.Queue()
        self._queued: set[Key] = set()
        self._running: set[Key] = set()
        self._dirty: set[Key] = set()
        self._timers: dict[Key, asyncio.TimerHandle] = {}
        self._failures: dict[Key, int] = {}
        self._workers = workers
        self._tasks: list[asyncio.Task] = []
        self._started: dict[Key, float] = {}  # key -> time.monotonic() its running pass began
        self._idle = asyncio.Event()  # no pass running
        self._idle.set()
        self._closing = False

    def start(self) -> None:
        """Run passes from now on; keys woken before wait until then (the operator starts its queue once every
        index it reads has been listed)."""
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._work()) for _ in range(self._workers)]

    def wake(self, key: Key) -> None:
        if self._closing:
            return
        if key in self._running:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._queue.put_nowait(key)

    def wake_after(self, key: Key, delay: float) -> None:
        if self._closing:
            return
        earlier = self._timers.get(key)
        when = asyncio.get_running_loop().time() + delay
        if earlier is not None and earlier.when() <= when:
            return
        if earlier is not None:
            earlier.cancel()
        self._timers[key] = asyncio.get_running_loop().call_at(when, self._fire, key)

    def _fire(self, key: Key) -> None:
        self._timers.pop(key, None)
        self.wake(key)

    async def _work(self) -> None:
        while True:
            key = await self._queue.get()
            self._queued.discard(key)
            if self._closing:
                return
            self._running.add(key)
            self._started[key] = time.monotonic()
            self._idle.clear()
            try:
                delay = await self._reconcile(key)
                self._failures.pop(key, None)
            except Exception as error:  # one job's failure must not stop the others; retry it with its own backoff
                failures = self._failures[key] = self._failures.get(key, 0) + 1
                delay = failure_backoff(failures)
                if isinstance(error, PassFailed):
                    due, error = error.requeue_after, error.error
                    delay = delay if due is None else min(delay, due)
                # The traceback once; the retries of a lasting refusal (a quota) in one line each.
                log.error(
                    "reconcile of %s failed (%d in a row): %s; retrying in %gs",
                    key,
                    failures,
                    error,
                    delay,
                    exc_info=failures == 1,
                )
            finally:
                self._running.discard(key)
                self._started.pop(key, None)
                if not self._running:
                    self._idle.set()
            if key in self._dirty:
                self._dirty.discard(key)
                self.wake(key)
            if delay is not None:
                if delay <= 0:
                    self.wake(key)
                else:
                    self.wake_after(key, delay)

    def pending_timers(self) -> dict[Key, float]:
        """Seconds until each delayed wake: nothing here means no request until a watch event."""
        now = asyncio.get_running_loop().time()
        return {key: timer.when() - now for key, timer in self._timers.items()}

    def stalled(self, limit: float) -> str | None:
        """What makes no progress: a pass running for longer than `limit` seconds (passes give up well before:
        reconciler.PASS_SECONDS), so the liveness probe can restart a wedged operator. Any thread may ask."""
        started = self._started.copy()
        now = time.monotonic()
        late = {key: now - began for key, began in started.items() if now - began > limit}
        if not late:
            return None
        key, seconds = max(late.items(), key=lambda item: item[1])
        return f"the pass of {key} has run for {seconds:.0f}s ({len(late)} passes over {limit:g}s)"

    async def close(self, grace: float = 0.0) -> None:
        """Take no more work, wait up to `grace` seconds for the passes under way (on SIGTERM: what they decided
        is written and acted on before the Lease goes to another replica), then stop."""
        self._closing = True
        for timer in self._timers.values():
            timer.cancel()
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except asyncio.TimeoutError:
            log.warning("stopping with passes still under way: %s", sorted(map(str, self._running)))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
