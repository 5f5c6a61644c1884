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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
PROGRESS_KEY = "progress.json"
MIN_INTERVAL_SECONDS = 10.0  # the status follows within ~30 s without a write per step


class ConfigMapProgressReporter:
    def __init__(self, api_server: str, namespace: str, name: str, token_file: Path, ca_file: Path) -> None:
        self.url = f"{api_server}/api/v1/namespaces/{namespace}/configmaps/{name}"
        self.token_file = token_file
        self.context = ssl.create_default_context(cafile=str(ca_file))
        self.last_sent = 0.0
        self.last_checkpoint_sent: Any = None
        self.started: tuple[float, int] | None = None
        self.warned = False

    @classmethod
    def from_env(cls) -> ConfigMapProgressReporter | None:
        """A reporter when running in a pod of a FineTuneJob with a token; None elsewhere."""
        name = os.environ.get("FINETUNE_PROGRESS_CONFIG_MAP")
        namespace = os.environ.get("FINETUNE_NAMESPACE")
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
        token_file = SERVICE_ACCOUNT_DIR / "token"
        if not (name and namespace and host and port and token_file.exists()):
            return None
        host = f"[{host}]" if ":" in host else host
        return cls(f"https://{host}:{port}", namespace, name, token_file, SERVICE_ACCOUNT_DIR / "ca.crt")

    def __call__(self, progress: dict[str, Any]) -> None:
        now = time.monotonic()
        step = int(progress.get("step", 0))
        if self.started is None:
            self.started = (now, step)
        total = progress.get("totalSteps")
        new_checkpoint = progress.get("lastCheckpointStep") != self.last_checkpoint_sent
        finished = total is not None and step >= total
        if now - self.last_sent < MIN_INTERVAL_SECONDS and not new_checkpoint and not finished:
            return
        report = dict(progress)
        report["time"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        started_at, started_step = self.started
        if total and step > started_step:
            report["etaSeconds"] = int((total - step) * (now - started_at) / (step - started_step))
        if self._patch(report):
            self.last_sent = now
            self.last_checkpoint_sent = progress.get("lastCheckpointStep")

    def _patch(self, report: dict[str, Any]) -> bool:
        body = json.dumps({"data": {PROGRESS_KEY: json.dumps(report)}}).encode()
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
