"""Fixtures of the multi-process trainer tests (see harness.py)."""

from tests.trainer.harness import start_workers, tiny_data, tiny_model  # noqa: F401  (pytest fixtures)
