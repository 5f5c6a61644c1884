"""Rank 0's progress, written to the job's progress ConfigMap for the operator to copy into the status.

The worker's ServiceAccount may get and patch that one ConfigMap and nothing else. Plain HTTPS with the
mounted token: no Kubernetes client in the trainer image. Reporting never stops training: failures are
logged once and the run goes on.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

from .contract import NAMESPACE_ENV, PROGRESS_CONFIG_MAP_ENV, PROGRESS_KEY, ProgressReport

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MIN_INTERVAL_SECONDS = 10.0  # the status follows within ~30 s without a write per step


class ConfigMapProgressReporter:
    def __init__(self, api_server: str, namespace: str, name: str, token_file: Path, ca_file: Path) -> None:
        self.url = f"{api_server}/api/v1/namespaces/{namespace}/configmaps/{name}"
        self.token_file = token_file
        self.context = ssl.create_default_context(cafile=str(ca_file))
        self.last_sent = 0.0
        self.last_checkpoint_sent: int | None = None
        self.warned = False

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
        now = time.monotonic()
        new_checkpoint = progress.last_checkpoint_step != self.last_checkpoint_sent
        finished = progress.total_steps is not None and progress.step >= progress.total_steps
        if now - self.last_sent < MIN_INTERVAL_SECONDS and not new_checkpoint and not finished:
            return
        if self._patch(progress):
            self.last_sent = now
            self.last_checkpoint_sent = progress.last_checkpoint_step

    def _patch(self, report: ProgressReport) -> bool:
        body = json.dumps({"data": {PROGRESS_KEY: report.to_json()}}).encode()
        request = urllib.request.Request(self.url, data=body, method="PATCH")
        request.add_header("Content-Type", "application/merge-patch+json")
        request.add_header("Authorization", f"Bearer {self.token_file.read_text().strip()}")
        try:
            with urllib.request.urlopen(request, context=self.context, timeout=5):
                return True
        except (urllib.error.URLError, OSError) as e:
            if not self.warned:
                log.warning("cannot report progress to ConfigMap %s (training goes on): %s", self.url, e)
                self.warned = True
            return False
