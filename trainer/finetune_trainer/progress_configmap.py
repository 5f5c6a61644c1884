"""Rank 0's progress, written to the job's progress ConfigMap for the operator to copy into the status.

The worker's ServiceAccount may get and patch that one ConfigMap and nothing else. Plain HTTPS with the
mounted token: no Kubernetes client in the trainer image. Reporting never stops or slows training: the
training thread only hands the latest report over; a sender thread patches at most every
MIN_INTERVAL_SECONDS (at once for a new checkpoint or the end), and while the API server is away it backs
off (1 s doubling to MAX_BACKOFF_SECONDS), sending only the newest report when it is back. Failures are
logged once and the run goes on.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from .contract import NAMESPACE_ENV, PROGRESS_CONFIG_MAP_ENV, PROGRESS_KEY, ProgressReport

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MIN_INTERVAL_SECONDS = 10.0  # the status follows within ~30 s without a write per step
MAX_BACKOFF_SECONDS = 60.0
REQUEST_TIMEOUT_SECONDS = 5.0
CLOSE_TIMEOUT_SECONDS = 10.0  # how long the end of a run waits for the last report to go out


class ConfigMapProgressReporter:
    """A progress hook: `reporter(report)` returns at once; a daemon thread does the HTTP."""

    def __init__(
        self,
        api_server: str,
        namespace: str,
        name: str,
        token_file: Path,
        ca_file: Path | None,
        min_interval_seconds: float = MIN_INTERVAL_SECONDS,
    ) -> None:
        self.url = f"{api_server}/api/v1/namespaces/{namespace}/configmaps/{name}"
        self.token_file = token_file
        self.context = ssl.create_default_context(cafile=str(ca_file)) if ca_file is not None else None
        self.min_interval_seconds = min_interval_seconds
        self.attempts = 0  # PATCH requests made (successful or not)
        self.warned = False
        self._cond = threading.Condition()
        self._pending: ProgressReport | None = None
        self._closing = False
        self._last_sent = -float("inf")
        self._last_checkpoint_sent: int | None = None
        self._backoff = 0.0
        self._retry_at = 0.0
        self._thread = threading.Thread(target=self._send_loop, name="progress-configmap", daemon=True)
        self._thread.start()

    @classmethod
    def from_env(cls) -> ConfigMapProgressReporter | None:
        """A reporter when running in a pod of a FineTuneJob with a token; None elsewhere."""
        name = os.environ.get(PROGRESS_CONFIG_MAP_ENV)
        namespace = os.environ.get(NAMESPACE_ENV)
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
        token_file = SERVICE_ACCOUNT_DIR / "token"
        if not (name and namespace and host and port and token_file.exists()):
            return None
        host = f"[{host}]" if ":" in host else host
        return cls(f"https://{host}:{port}", namespace, name, token_file, SERVICE_ACCOUNT_DIR / "ca.crt")

    def __call__(self, progress: ProgressReport) -> None:
        with self._cond:
            self._pending = progress
            self._cond.notify()

    def close(self, timeout: float = CLOSE_TIMEOUT_SECONDS) -> None:
        """Send what is pending now (backoff or not), then stop the thread; wait at most `timeout` seconds."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)

    def _send_at(self, report: ProgressReport) -> float:
        """When `report` may go out: after the backoff, and after the interval unless it is news."""
        new_checkpoint = report.last_checkpoint_step != self._last_checkpoint_sent
        finished = report.total_steps is not None and report.step >= report.total_steps
        interval_over = self._retry_at if new_checkpoint or finished else self._last_sent + self.min_interval_seconds
        return max(self._retry_at, interval_over)

    def _send_loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._pending is None and self._closing:
                        return
                    if self._pending is not None:
                        wait = self._send_at(self._pending) - time.monotonic()
                        if wait <= 0 or self._closing:
                            break
                    else:
                        wait = None
                    self._cond.wait(wait)
                report, self._pending = self._pending, None
                closing = self._closing
            sent = self._patch(report)
            with self._cond:
                now = time.monotonic()
                if sent:
                    self._last_sent, self._last_checkpoint_sent, self._backoff = now, report.last_checkpoint_step, 0.0
                    self._retry_at = now
                else:
                    self._backoff = min(max(1.0, 2 * self._backoff), MAX_BACKOFF_SECONDS)
                    self._retry_at = now + self._backoff
                    if self._pending is None and not closing:
                        self._pending = report  # retried after the backoff unless a newer one comes

    def _patch(self, report: ProgressReport) -> bool:
        self.attempts += 1
        body = json.dumps({"data": {PROGRESS_KEY: report.to_json()}}).encode()
        request = urllib.request.Request(self.url, data=body, method="PATCH")
        request.add_header("Content-Type", "application/merge-patch+json")
        try:
            request.add_header("Authorization", f"Bearer {self.token_file.read_text().strip()}")
            with urllib.request.urlopen(request, context=self.context, timeout=REQUEST_TIMEOUT_SECONDS):
                return True
        except (urllib.error.URLError, OSError) as e:
            if not self.warned:
                log.warning("cannot report progress to ConfigMap %s (training goes on, retrying): %s", self.url, e)
                self.warned = True
            return False
