"""A deduplicating work queue of job keys, as controller-runtime has: one reconcile per key at a time.

Watch events only wake a key; many wakes while it waits coalesce into one pass, a wake during a pass
runs it once more afterwards, and delayed wakes (backoff, deadlines, TTL) use the event loop's timers.
No finalizers, no polling: state lives in the API server, so a lost wake-up costs nothing after a restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable

log = logging.getLogger(__name__)

Reconcile = Callable[[Hashable], Awaitable[float | None]]  # returns seconds until the next pass, if any


class WorkQueue:
    def __init__(self, reconcile: Reconcile, workers: int) -> None:
        self._reconcile = reconcile
        self._queue: asyncio.Queue[Hashable] = asyncio.Queue()
        self._queued: set[Hashable] = set()
        self._running: set[Hashable] = set()
        self._dirty: set[Hashable] = set()
        self._timers: dict[Hashable, asyncio.TimerHandle] = {}
        self._workers = workers
        self._tasks: list[asyncio.Task] = []

    def wake(self, key: Hashable) -> None:
        if not self._tasks:
            # Started from the first wake, inside a kopf handler, so the workers inherit its context
            # (kopf.event() needs the event-posting queue kept in context variables).
            self._tasks = [asyncio.create_task(self._work()) for _ in range(self._workers)]
        if key in self._running:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._queue.put_nowait(key)

    def wake_after(self, key: Hashable, delay: float) -> None:
        earlier = self._timers.get(key)
        when = asyncio.get_running_loop().time() + delay
        if earlier is not None and earlier.when() <= when:
            return
        if earlier is not None:
            earlier.cancel()
        self._timers[key] = asyncio.get_running_loop().call_at(when, self._fire, key)

    def _fire(self, key: Hashable) -> None:
        self._timers.pop(key, None)
        self.wake(key)

    async def _work(self) -> None:
        while True:
            key = await self._queue.get()
            self._queued.discard(key)
            self._running.add(key)
            try:
                delay = await self._reconcile(key)
            except Exception:  # one job's failure must not stop the others; retry it with a delay
                log.exception("reconcile of %s failed; retrying in 5s", key)
                delay = 5.0
            finally:
                self._running.discard(key)
            if key in self._dirty:
                self._dirty.discard(key)
                self.wake(key)
            if delay is not None:
                if delay <= 0:
                    self.wake(key)
                else:
                    self.wake_after(key, delay)

    async def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
