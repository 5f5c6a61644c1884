"""The attempt fence: an older attempt's rank 0 that runs on after a newer attempt started writes nothing."""

from __future__ import annotations

import json

import pytest

from finetune_trainer.contract import ATTEMPT_ENV, METRICS_FILE, PROGRESS_FILE, ProgressReport
from finetune_trainer.entrypoint import run
from finetune_trainer.fence import FENCE_FILE, AttemptFence, Fenced
from tests.trainer.harness import write_config


def test_an_old_attempts_rank_0_running_on_writes_nothing_once_a_newer_attempt_claimed_the_folder(
    tmp_path, tiny_model, tiny_data, monkeypatch
):
    output = tmp_path / "out"
    config = write_config(
        tmp_path / "config.yaml", tiny_model, tiny_data, output, maxSteps=12, checkpoint={"intervalSteps": 4}
    )
    monkeypatch.setenv(ATTEMPT_ENV, "0")
    monkeypatch.setenv("FINETUNE_TERMINATION_LOG", str(tmp_path / "termination.log"))
    seen: list[ProgressReport] = []

    def newer_attempt_starts(report: ProgressReport) -> None:
        seen.append(report)
        if len(seen) == 1:  # attempt 0 is loading (a zombie on a lost node) when attempt 1's rank 0 starts
            AttemptFence(output, attempt="1").claim()

    code = run(str(config), on_progress=newer_attempt_starts)

    assert code != 0
    assert "attempt 0 is fenced off" in (tmp_path / "termination.log").read_text()
    assert [r.activity for r in seen] == ["loading"]  # nothing reported after the claim
    assert not (output / "checkpoints").exists() or not any((output / "checkpoints").iterdir())
    assert not (output / "adapter").exists() and not (output / METRICS_FILE).exists()
    assert ProgressReport.model_validate_json((output / PROGRESS_FILE).read_text()).activity == "loading"
    assert json.loads((output / FENCE_FILE).read_text())["attempt"] == "1"


def test_the_newest_claim_owns_the_folder(tmp_path):
    old, new = AttemptFence(tmp_path, attempt="3"), AttemptFence(tmp_path, attempt="4")
    old.check()  # nothing claimed yet: nothing to refuse
    old.claim()
    old.check()
    new.claim()
    new.check()
    with pytest.raises(Fenced, match=r"attempt 3 is fenced off .*: attempt 4 "):
        old.check()
