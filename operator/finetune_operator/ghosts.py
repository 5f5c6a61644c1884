"""Pods the watch index still holds after the API server deleted them during a watch gap: ghosts.

After a gap (410 Gone, a dropped connection) kopf lists the pods again and replays each as an event of type
None, but nothing tells it about the pods that went meanwhile, so their index entries stay. A pod that no
event has mentioned since such a listing began is one of those, once the listing has gone quiet. The
reconciler also finds ghosts when a delete answers 404 (reconciler.Outcome.ghosts), so one never blocks a job.
"""

from __future__ import annotations

from collections.abc import Iterable

# A listing replays its pods in a burst; this long without a replayed pod, it is over.
LISTING_QUIET_SECONDS = 5.0


class Ghosts:
    """Which indexed pods are ghosts (by uid: uids are never reused). The clock is passed in."""

    def __init__(self) -> None:
        self.uids: set[str] = set()
        self._seen: dict[str, float] = {}  # uid -> last event about it
        self._listing_since: float | None = None
        self._last_listed = float("-inf")

    def saw(self, uid: str, event_type: str | None, now: float) -> bool:
        """Record a pod event; True when it starts a listing (then call sweep once it is quiet)."""
        if event_type == "DELETED":
            self._seen.pop(uid, None)
            self.uids.discard(uid)
            return False
        self._seen[uid] = now
        if event_type is not None:
            return False
        started = self._listing_since is None
        if started:
            self._listing_since = now
        self._last_listed = now
        return started

    def quiet_in(self, now: float) -> float:
        """Seconds until the current listing counts as over (0: it is)."""
        return max(self._last_listed + LISTING_QUIET_SECONDS - now, 0.0)

    def sweep(self, indexed: Iterable[str], now: float) -> set[str]:
        """After a quiet listing: the indexed pods it did not mention are ghosts. Returns the new ones."""
        if self._listing_since is None or self.quiet_in(now) > 0:
            return set()
        since, self._listing_since = self._listing_since, None
        found = {uid for uid in indexed if self._seen.get(uid, float("-inf")) < since} - self.uids
        for uid in found:
            self._seen.pop(uid, None)
        self.uids |= found
        return found

    def add(self, uids: Iterable[str]) -> None:
        """Ghosts the reconciler found (a delete answered 404)."""
        self.uids.update(uids)
