"""The progress ConfigMap reporter never holds up training: an API server that hangs or fails costs the
training thread nothing, failures back off, and the newest report goes out once the server answers."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from finetune_trainer.contract import PROGRESS_KEY, ProgressReport
from finetune_trainer.progress_configmap import ConfigMapProgressReporter
from tests.trainer.harness import wait_for


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text("t0ken\n")
    return path


class ApiServer:
    """A loopback HTTP server answering PATCHes with `status`, recording what it got."""

    def __init__(self, status: int):
        self.status = status
        self.bodies: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_PATCH(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.bodies.append(body)
                self.send_response(server.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *_args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def steps(self) -> list[int]:
        return [json.loads(body["data"][PROGRESS_KEY])["step"] for body in self.bodies]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def report(step: int, checkpoint: int | None = None) -> ProgressReport:
    return ProgressReport(step=step, total_steps=1000, last_checkpoint_step=checkpoint)


def test_a_hanging_api_server_does_not_stall_the_steps(token_file):
    # Listens but never answers: every request would wait for its 5 s timeout.
    hanging = socket.socket()
    hanging.bind(("127.0.0.1", 0))
    hanging.listen(16)
    try:
        url = f"http://127.0.0.1:{hanging.getsockname()[1]}"
        reporter = ConfigMapProgressReporter(url, "ns", "job-progress", token_file, None, min_interval_seconds=0)
        started = time.perf_counter()
        for step in range(200):  # one report per step, a checkpoint every 10
            reporter(report(step, checkpoint=step // 10 * 10))
        elapsed = time.perf_counter() - started
        assert elapsed < 0.5, f"200 reports took {elapsed:.2f} s on the training thread"
        wait_for(lambda: reporter.attempts >= 1, 5, "the sender thread's first attempt")
        assert reporter.attempts == 1  # still waiting on the hung request: no pile-up behind it
        started = time.perf_counter()
        reporter.close(timeout=0.2)
        assert time.perf_counter() - started < 1
    finally:
        hanging.close()


def test_failures_back_off_and_the_newest_report_goes_out_when_the_server_is_back(token_file):
    server = ApiServer(status=503)
    try:
        reporter = ConfigMapProgressReporter(server.url, "ns", "p", token_file, None, min_interval_seconds=0)
        deadline = time.monotonic() + 1.5
        step = 0
        while time.monotonic() < deadline:  # a report every 10 ms for 1.5 s, each one news (a new checkpoint)
            step += 1
            reporter(report(step, checkpoint=step))
            time.sleep(0.01)
        # 150 reports, but after the first failure the sender waits 1 s, then 2 s: at most 2 attempts
        assert 1 <= reporter.attempts <= 2, reporter.attempts
        server.status = 200
        reporter(report(step + 1, checkpoint=step + 1))
        wait_for(lambda: server.steps()[-1:] == [step + 1], 10, "the newest report after the backoff")
        reporter.close()
        assert len(server.steps()) <= 4
    finally:
        server.close()


def test_reports_are_rate_limited_but_checkpoints_and_the_end_go_out_at_once(token_file):
    server = ApiServer(status=200)
    try:
        reporter = ConfigMapProgressReporter(server.url, "ns", "p", token_file, None, min_interval_seconds=60)
        reporter(report(1))
        wait_for(lambda: server.steps() == [1], 5, "the first report")
        reporter(report(2))  # within the interval, no news: held back
        reporter(report(3, checkpoint=3))  # a new checkpoint: sent at once (and supersedes step 2)
        wait_for(lambda: server.steps() == [1, 3], 5, "the checkpoint's report")
        reporter(report(4, checkpoint=3))
        reporter.close()  # the end: what is pending goes out
        assert server.steps() == [1, 3, 4]
        assert server.bodies and all(PROGRESS_KEY in body["data"] for body in server.bodies)
    finally:
        server.close()
