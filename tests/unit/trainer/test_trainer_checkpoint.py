"""Checkpoint files: atomic publication, manifest verification, corrupt ones skipped, retention."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from finetune_trainer.checkpoint import (
    Checkpoint,
    CorruptCheckpoint,
    apply_retention,
    capture_rng_state,
    changed_fields,
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    remove_unfinished,
    restore_rng_state,
    save_checkpoint,
    verify_checkpoint,
)


def fake_adapter(path: Path) -> None:
    path.mkdir()
    (path / "adapter_model.safetensors").write_bytes(b"\x01" * 1000)
    (path / "adapter_config.json").write_text("{}")


def save(root: Path, step: int, fingerprint: str = "f") -> Path:
    checkpoint = Checkpoint(
        step, fingerprint, {"progress": {"step": step}, "t": torch.arange(3.0)}, [{"r": 0}], {"model": "m"}
    )
    return save_checkpoint(root, checkpoint, fake_adapter)


def test_save_then_verify_and_load(tmp_path):
    path = save(tmp_path, 7)
    assert path == tmp_path / "step-7"
    manifest = verify_checkpoint(path)
    assert manifest["step"] == 7 and manifest["fingerprint"] == "f"
    assert set(manifest["files"]) == {
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "trainer_state.pt",
        "rng_states.pt",
        "config.json",
    }
    loaded = load_checkpoint(path, manifest)
    assert loaded.step == 7 and torch.equal(loaded.trainer_state["t"], torch.arange(3.0))
    assert loaded.rng_states == [{"r": 0}] and loaded.config == {"model": "m"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary left behind"


def test_a_failed_write_leaves_no_checkpoint(tmp_path):
    def broken(path: Path) -> None:
        path.mkdir()
        raise OSError("disk full")

    with pytest.raises(OSError):
        save_checkpoint(tmp_path, Checkpoint(3, "f", {}, [], {}), broken)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda p: (p / "trainer_state.pt").write_bytes((p / "trainer_state.pt").read_bytes()[:-10]), "bytes"),
        (lambda p: (p / "adapter" / "adapter_model.safetensors").write_bytes(b"\x02" * 1000), "sha256"),
        (lambda p: (p / "rng_states.pt").unlink(), "missing"),
        (lambda p: (p / "manifest.json").unlink(), "manifest"),
    ],
)
def test_damaged_checkpoints_fail_verification(tmp_path, damage, reason):
    path = save(tmp_path, 1)
    damage(path)
    with pytest.raises(CorruptCheckpoint, match=reason):
        verify_checkpoint(path)


def test_latest_valid_skips_a_truncated_newest_with_a_warning(tmp_path, caplog):
    save(tmp_path, 10)
    newest = save(tmp_path, 20)
    state = newest / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        path, manifest = latest_valid_checkpoint(tmp_path)
    assert path.name == "step-10" and manifest["step"] == 10
    assert "skipping corrupt checkpoint" in caplog.text and "step-20" in caplog.text
    assert latest_valid_checkpoint(tmp_path / "nothing-here") is None


def test_listing_ignores_unfinished_and_retention_keeps_the_newest(tmp_path):
    for step in (5, 10, 15, 20):
        save(tmp_path, step)
    (tmp_path / ".tmp-step-25-abcd").mkdir()
    (tmp_path / "step-x").mkdir()
    assert [step for step, _ in list_checkpoints(tmp_path)] == [20, 15, 10, 5]
    apply_retention(tmp_path, keep_last=2, known_valid=set())
    remove_unfinished(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-15", "step-20", "step-x"]


def test_retention_never_counts_a_corrupt_checkpoint_and_sets_it_aside(tmp_path, caplog):
    """A corrupt newer step-20 used to make keepLast delete every new valid checkpoint right after writing."""
    save(tmp_path, 5)
    corrupt = save(tmp_path, 20)
    (corrupt / "trainer_state.pt").write_bytes(b"garbage")
    written = save(tmp_path, 10)
    with caplog.at_level(logging.WARNING):
        apply_retention(tmp_path, keep_last=1, known_valid={written})
    assert [p.name for _, p in list_checkpoints(tmp_path)] == ["step-10"]
    assert (tmp_path / ".corrupt-step-20" / "manifest.json").exists()  # set aside, for a look
    assert "corrupt checkpoint" in caplog.text and "step-20" in caplog.text
    remove_unfinished(tmp_path)
    assert latest_valid_checkpoint(tmp_path)[0].name == "step-10"


def test_retention_verifies_only_what_it_does_not_know(tmp_path):
    paths = [save(tmp_path, step) for step in (1, 2, 3)]
    (paths[0] / "trainer_state.pt").write_bytes(b"garbage")  # the oldest is corrupt...
    known = {paths[2]}
    apply_retention(tmp_path, keep_last=3, known_valid=known)
    assert known == {paths[1], paths[2]}  # ...so it is set aside rather than kept as valid
    assert [p.name for _, p in list_checkpoints(tmp_path)] == ["step-3", "step-2"]


def test_saving_a_step_again_replaces_it(tmp_path):
    save(tmp_path, 4, fingerprint="old")
    save(tmp_path, 4, fingerprint="new")
    assert json.loads((tmp_path / "step-4" / "manifest.json").read_text())["fingerprint"] == "new"


def test_rng_state_round_trip():
    state = capture_rng_state(torch.device("cpu"))
    expected = torch.rand(3)
    torch.rand(5)
    restore_rng_state(state, torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected)


def test_changed_fields_names_dotted_paths():
    old = {"model": "a", "training": {"learningRate": 1e-4, "seed": 1}}
    new = {"model": "a", "training": {"learningRate": 2e-4, "seed": 1}}
    assert changed_fields(old, new) == ["training.learningRate (0.0001 -> 0.0002)"]
