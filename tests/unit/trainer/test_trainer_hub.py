"""A hub model the hub refuses: a fake hub on loopback answers as huggingface.co does (see fake_hub.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from finetune_trainer.contract import ExitCode
from tests.trainer.fake_hub import FakeHub
from tests.trainer.harness import TRAINER_SRC, write_config


@pytest.fixture
def fake_hub():
    hub = FakeHub()
    yield hub
    hub.close()


def train_hub_model(tmp_path: Path, tiny_data: Path, hub: FakeHub, repo: str) -> tuple[int, str]:
    config = write_config(tmp_path / "config.yaml", repo, tiny_data, tmp_path / "out")  # type: ignore[arg-type]
    termination = tmp_path / "termination.log"
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(TRAINER_SRC),
        "HF_ENDPOINT": hub.endpoint,
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
