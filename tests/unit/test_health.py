"""/healthz: green while nothing is stuck, red with what is (the operator's own server, a standby's too)."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

from finetune_operator.cli import _serving_health


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_healthz_turns_red_with_the_stuck_parts_named():
    problems: list[str] = []
    port = free_port()
    with _serving_health(port, lambda: list(problems)):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as reply:
            assert reply.status == 200
        problems.append("the pass of ('ml', 'j') has run for 130s (1 passes over 120s)")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
        except urllib.error.HTTPError as error:
            assert error.code == 500 and b"('ml', 'j') has run for 130s" in error.read()
        else:
            raise AssertionError("a stuck pass left /healthz green")
