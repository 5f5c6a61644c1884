"""Fixtures of the trainer unit tests: a tiny offline model, its tokenizer, and data (see harness.py)."""

from __future__ import annotations

import pytest

from tests.trainer.harness import tiny_data, tiny_model  # noqa: F401  (pytest fixtures)


@pytest.fixture(scope="session")
def tokenizer(tiny_model):  # noqa: F811  (the fixture imported above)
    from finetune_trainer.model import load_tokenizer

    return load_tokenizer(str(tiny_model))


@pytest.fixture(autouse=True)
def _no_distributed_env(monkeypatch, tmp_path):
    """Unit tests run single-process whatever the environment says, and never touch /dev/termination-log."""
    for name in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "NNODES",
        "NODE_RANK",
        "NPROC_PER_NODE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "TORCHELASTIC_RUN_ID",
    ):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(f"PET_{name}", raising=False)
    monkeypatch.setenv("FINETUNE_TERMINATION_LOG", str(tmp_path / "termination.log"))


def pytest_configure(config):
    # peft asks transformers 5 a deprecated question on every get_peft_model; not ours to fix.
    config.addinivalue_line("filterwarnings", "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
