"""kube.py: credentials read at most once a minute (through the client's refresh hook); the pause in pod creates;
no request outlasts its timeout against a server that accepts connections and never answers."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import kubernetes
import pytest

from finetune_operator import kube


def test_credentials_are_read_once_a_minute_and_a_rotated_token_is_used_after_that(monkeypatch):
    token = ["first"]  # the token file's content
    reads = []

    def refresh(configuration: kubernetes.client.Configuration) -> None:  # as the kubeconfig loaders install
        reads.append(1)
        configuration.api_key["BearerToken"] = f"Bearer {token[0]}"

    configuration = kubernetes.client.Configuration(api_key={"BearerToken": "Bearer first"})
    configuration.refresh_api_key_hook = refresh
    client = kubernetes.client.ApiClient(configuration)
    now = [1000.0]
    monkeypatch.setattr(kube.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(kube, "_credentials", (-kube.AUTH_REFRESH_SECONDS, {}))

    assert kube._auth_headers(client) == {"authorization": "Bearer first"}
    token[0] = "rotated"
    now[0] += kube.AUTH_REFRESH_SECONDS - 1
    assert kube._auth_headers(client) == {"authorization": "Bearer first"}
    assert len(reads) == 1  # not once per request
    now[0] += 1
    assert kube._auth_headers(client) == {"authorization": "Bearer rotated"}
    assert len(reads) == 2


def test_background_work_waits_for_a_pause_in_pod_creates_and_no_longer_than_at_most():
    now = [100.0]

    def sleep(seconds: float) -> None:
        now[0] = round(now[0] + seconds, 6)  # a clock's resolution

    creates = kube.PodCreates(pause=0.3, at_most=10.0, clock=lambda: now[0], sleep=sleep)
    creates.wait_for_pause(since=now[0])
    assert now[0] == 100.0  # no pod create yet: at once
    with creates.creating():
        creates.wait_for_pause(since=now[0])  # a create in flight all along: until at_most
        assert now[0] == pytest.approx(110.0)
    creates.wait_for_pause(since=now[0])  # the create just ended: for the pause
    assert now[0] == pytest.approx(110.3)
    creates.wait_for_pause(since=now[0])  # paused long enough already
    assert now[0] == pytest.approx(110.3)


class SilentServer:
    """A loopback server that accepts every connection and never answers (a half-dead or partitioned API
    server behind a live load balancer); counts the connections, so a hidden retry shows."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(connection)  # held open, never read from or written to

    def close(self) -> None:
        self.listener.close()
        for connection in self.connections:
            connection.close()


@pytest.fixture
def silent(monkeypatch: pytest.MonkeyPatch) -> Iterator[SilentServer]:
    server = SilentServer()
    client = kube.client_for(kubernetes.client.Configuration(host=server.url))
    monkeypatch.setattr(kube, "api_client", lambda: client)
    monkeypatch.setattr(kube, "_credentials", (-kube.AUTH_REFRESH_SECONDS, {}))
    monkeypatch.setattr(kube, "READ_SECONDS", 0.5)
    monkeypatch.setattr(kube, "WATCH_SECONDS", 0)  # its read timeout: the slack only
    monkeypatch.setattr(kube, "WATCH_READ_SLACK_SECONDS", 0.5)
    yield server
    client.close()
    server.close()


def seconds_to_fail(call: Callable[[], Any], at_most: float = 10.0) -> float:
    """How long call took to raise (a thread, so that a call that never ends fails the test, not hangs it)."""
    outcome: list[Any] = []

    def run() -> None:
        started = time.monotonic()
        try:
            call()
        except Exception as error:
            outcome.append((time.monotonic() - started, error))
        else:
            outcome.append((time.monotonic() - started, None))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(at_most)
    assert outcome, f"still blocked after {at_most}s"
    took, error = outcome[0]
    assert error is not None, "answered by a server that never answers?"
    return took


JOB = {"metadata": {"name": "j", "namespace": "ml", "resourceVersion": "1"}, "kind": "FineTuneJob"}
POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "j-worker-0", "namespace": "ml"}}
REQUESTS = {
    "get_job": lambda: kube.get_job("ml", "j"),
    "patch_job_status": lambda: kube.patch_job_status("ml", "j", {"phase": "Running"}, "1"),
    "delete_job": lambda: kube.delete_job("ml", "j", "uid-1"),
    "delete_pod": lambda: kube.delete_pod("ml", "j-worker-0", "uid-2"),
    "get": lambda: kube.get("Pod", "ml", "j-worker-0"),
    "replace": lambda: kube.replace({**JOB, "kind": "Lease"}),
    "patch": lambda: kube.patch("ConfigMap", "ml", "j-config", {"metadata": {"annotations": {}}}, "1"),
    "create": lambda: kube.create(POD),
    "delete": lambda: kube.delete("Service", "ml", "j"),
    "owner_uids": lambda: kube.owner_uids("Service", "ml", "j"),
    "list_objects": lambda: kube.list_objects("Pod", None, "finetune.dev/job"),
    "watch": lambda: next(iter(kube.watch("Pod", None, "finetune.dev/job", "1"))),
}


@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_no_request_outlasts_its_timeout_against_a_server_that_never_answers(silent, name):
    took = seconds_to_fail(REQUESTS[name])
    # The read timeout (0.5 s; a watch: its server-side end plus the slack), once: no retry under it.
    assert 0.4 < took < 1.5
    assert len(silent.connections) == 1


def test_a_deadline_bounds_a_sequence_of_requests_and_the_parallel_creates_in_it(silent, monkeypatch):
    monkeypatch.setattr(kube, "READ_SECONDS", 30.0)

    def a_pass() -> None:
        with kube.deadline(1.0):
            with contextlib.suppress(Exception):  # the pass goes on, as the reconciler does after a failed create
                kube.in_parallel([lambda: kube.create(POD), lambda: kube.create(POD)])
            kube.get_job("ml", "j")

    started = time.monotonic()
    took = seconds_to_fail(a_pass)
    assert took < 2.0  # not 30 s per request
    assert time.monotonic() - started < 2.5
    with pytest.raises(kube.DeadlineExceeded), kube.deadline(0):
        kube.get_job("ml", "j")


def test_every_write_names_the_operator_as_its_field_manager(monkeypatch):
    sent: list[tuple[str, str]] = []

    class Reply:
        status = 200

        def read(self) -> bytes:
            return b"{}"

    def send(method, path, body=None, content_type=None, timeout=None):
        sent.append((method, path))
        return Reply()

    monkeypatch.setattr(kube, "_send", send)
    kube.create(POD)
    kube.replace({**JOB, "kind": "Lease"})
    kube.patch_job_status("ml", "j", {"phase": "Running"}, "1")
    kube.get("Pod", "ml", "j-worker-0")
    writes = [path for method, path in sent if method != "GET"]
    assert len(writes) == 3 and all(path.endswith("?fieldManager=finetune-operator") for path in writes)
    assert not any("fieldManager" in path for method, path in sent if method == "GET")


def test_a_shutdown_waits_for_the_work_handed_to_the_background():
    release, done = threading.Event(), []

    def event() -> None:  # an Event or a gang's companions, still being posted
        release.wait(5)
        done.append(1)

    kube.when_pods_pause(event)
    assert not kube.background.wait_idle(0.1)
    release.set()
    assert kube.background.wait_idle(5) and done == [1]
