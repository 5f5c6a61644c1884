"""A hub model in a pod of 2 processes sharing one HF_HOME: it is downloaded once, and both ranks train."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

from tests.trainer.fake_hub import FakeHub
from tests.trainer.harness import free_port, worker_env, write_config


def test_two_processes_of_a_pod_download_a_hub_model_once_and_train(tiny_model, tiny_data, tmp_path):
    hub = FakeHub({"acme/tiny": tiny_model})
    try:
        config = write_config(tmp_path / "config.yaml", "acme/tiny", tiny_data, tmp_path / "out", maxSteps=2)  # type: ignore[arg-type]
        env = worker_env(0, 1, free_port(), tmp_path)
        env.update(
            NPROC_PER_NODE="2",
            PET_NPROC_PER_NODE="2",
            WORLD_SIZE="2",
            HF_ENDPOINT=hub.endpoint,
            HF_HOME=str(tmp_path / "hf-home"),
            HF_HUB_DISABLE_TELEMETRY="1",
        )
        process = subprocess.run(
            [sys.executable, "-m", "finetune_trainer", "--config", str(config)],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
    finally:
        hub.close()
    assert process.returncode == 0, process.stderr[-3000:]
    downloads = Counter(path for method, path in hub.requests if method == "GET" and "/resolve/" in path)
    assert downloads and set(downloads.values()) == {1}, downloads  # each file once, though two processes load it
    assert {path.rsplit("/", 1)[-1] for path in downloads} >= {"model.safetensors", "config.json", "tokenizer.json"}
    adapter_config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "acme/tiny"  # the hub id, not the pod's cache dir
