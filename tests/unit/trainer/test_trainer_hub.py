"""A hub model the hub refuses: a fake hub on loopback answers as huggingface.co does (status and X-Error-Code)."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from finetune_trainer.contract import ExitCode
from tests.trainer.harness import TRAINER_SRC, write_config

# (status, headers) as the hub answers GET /api/models/<repo>/revision/main
ANSWERS = {
    "not-found": (401, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}),
    "gated": (403, {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to model acme/gated is restricted."}),
    "forbidden": (403, {"X-Error-Message": "Your token has no read access"}),
    "missing": (404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}),
    "down": (503, {}),
}


class FakeHub(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        name = self.path.split("/api/models/acme/", 1)[-1].split("/", 1)[0]
        status, headers = ANSWERS.get(name, (404, {"X-Error-Code": "RepoNotFound"}))
        self.server.requests.append(self.path)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Type", "application/json")
        body = b'{"error": "refused"}'
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fake_hub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def train_hub_model(tmp_path: Path, tiny_data: Path, hub: http.server.HTTPServer, repo: str) -> tuple[int, str]:
    config = write_config(tmp_path / "config.yaml", repo, tiny_data, tmp_path / "out")  # type: ignore[arg-type]
    termination = tmp_path / "termination.log"
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(TRAINER_SRC),
        "HF_ENDPOINT": f"http://127.0.0.1:{hub.server_address[1]}",
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "FINETUNE_TERMINATION_LOG": str(termination),
        "OMP_NUM_THREADS": "1",
    }
    process = subprocess.run(
        [sys.executable, "-m", "finetune_trainer", "--config", str(config)], env=env, capture_output=True, timeout=120
    )
    return process.returncode, termination.read_text() if termination.exists() else process.stderr.decode()[-2000:]


@pytest.mark.parametrize("repo", ["not-found", "gated", "forbidden", "missing"])
def test_a_hub_refusal_exits_2_naming_spec_model_and_hf_token(repo, tmp_path, tiny_data, fake_hub):
    code, message = train_hub_model(tmp_path, tiny_data, fake_hub, f"acme/{repo}")
    assert code == ExitCode.PERMANENT, message
    assert "spec.model" in message and f"acme/{repo}" in message and "HF_TOKEN" in message
    assert fake_hub.requests, "the trainer never asked the fake hub"
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_a_hub_that_is_down_is_retryable(tmp_path, tiny_data, fake_hub):
    code, message = train_hub_model(tmp_path, tiny_data, fake_hub, "acme/down")
    assert code not in (ExitCode.DONE, ExitCode.PERMANENT), message
    assert "spec.model" not in message
