"""The attempt fence: only the newest gang's rank 0 writes into the run's output folder.

A gang restart deletes the old pods, but a pod force-deleted from a lost node may keep running: its rank 0
would go on writing checkpoints, the adapter and progress next to the new gang's. So rank 0 of every attempt
claims the folder as it starts (FENCE_FILE, a token of its own), and checks before each write that the token
is still its own; once a newer attempt has claimed the folder, the old one raises Fenced and writes nothing.
The newest claim wins, and attempts claim in the order they start.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from pathlib import Path

from .contract import ATTEMPT_ENV
from .files import atomic_write_json

FENCE_FILE = ".attempt"


class Fenced(RuntimeError):
    """A newer attempt owns the output folder: this process must not write to it."""


class AttemptFence:
    def __init__(self, output_dir: Path, attempt: str | None = None) -> None:
        self.path = Path(output_dir) / FENCE_FILE
        self.attempt = attempt if attempt is not None else os.environ.get(ATTEMPT_ENV, "?")
        self.token = uuid.uuid4().hex
        self.claimed = False

    def claim(self) -> None:
        """Make the folder this process's: from now on an older attempt's check fails."""
        atomic_write_json(self.path, {"attempt": self.attempt, "pod": socket.gethostname(), "token": self.token})
        self.claimed = True

    def check(self) -> None:
        """Raise Fenced when another process claimed the folder after this one (a no-op before claim)."""
        if not self.claimed:
            return
        try:
            owner = json.loads(self.path.read_text())
        except (OSError, ValueError):
            owner = {}
        if owner.get("token") != self.token:
            raise Fenced(
                f"attempt {self.attempt} is fenced off {self.path.parent}: attempt {owner.get('attempt', '?')} "
                f"({owner.get('pod', 'unknown pod')}) took it over; this process writes nothing more"
            )
