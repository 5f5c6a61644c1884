"""Reporting: progress.json and hooks, metrics.json, the termination message, FLOPs and MFU."""

from __future__ import annotations

import json

import torch

from finetune_trainer.contract import ProgressReport
from finetune_trainer.metrics import (
    Counts,
    FlopsModel,
    Reporter,
    RunSummary,
    add_progress_hook,
    format_progress,
    peak_flops,
    remove_progress_hook,
    write_termination_message,
)


def test_progress_goes_to_progress_json_and_every_hook(tmp_path):
    seen, seen_by_registry = [], []
    add_progress_hook(seen_by_registry.append)
    try:
        reporter = Reporter(tmp_path, enabled=True, hooks=[seen.append])
        progress = format_progress(12, 40, 0.5, 1.25, 5100.0, 10, "2026-01-01T00:00:00Z")
        reporter.progress(progress)
    finally:
        remove_progress_hook(seen_by_registry.append)
    written = json.loads((tmp_path / "progress.json").read_text())
    assert {
        k: written[k]
        for k in ("step", "totalSteps", "loss", "tokensPerSecond", "lastCheckpointStep", "lastCheckpointTime", "epoch")
    } == {
        "step": 12,
        "totalSteps": 40,
        "loss": 1.25,
        "tokensPerSecond": 5100.0,
        "lastCheckpointStep": 10,
        "lastCheckpointTime": "2026-01-01T00:00:00Z",
        "epoch": 0.5,
    }
    assert seen == [ProgressReport.model_validate(written)] == seen_by_registry
    assert set(written) == {field.alias for field in ProgressReport.model_fields.values()}


def test_progress_estimates_the_time_left_from_this_process_pace(tmp_path, monkeypatch):
    clock = iter([100.0, 110.0])
    monkeypatch.setattr("finetune_trainer.metrics.time.monotonic", lambda: next(clock))
    reporter = Reporter(tmp_path, enabled=True)
    reporter.progress(format_progress(10, 40, 0.0, None, None, None, None))  # resumed at 10: no pace yet
    reporter.progress(format_progress(20, 40, 0.0, None, None, None, None))  # 10 steps in 10 s
    written = ProgressReport.from_json((tmp_path / "progress.json").read_bytes())
    assert written is not None and written.eta_seconds == 20


def test_liveness_repeats_the_last_report_at_once_for_a_new_activity_else_every_interval(tmp_path, monkeypatch):
    now = [100.0]
    monkeypatch.setattr("finetune_trainer.metrics.time.monotonic", lambda: now[0])
    seen: list[ProgressReport] = []
    reporter = Reporter(tmp_path, enabled=True, hooks=[seen.append])
    reporter.progress(format_progress(8, 40, 0.0, 1.5, None, 8, None))
    reporter.alive("evaluating")  # a new activity: at once, the last report's step and loss kept
    reporter.alive("evaluating")  # the same, within the interval: nothing
    now[0] += 10.0
    reporter.alive("evaluating")  # the interval over: liveness again
    reporter.alive("training", step=9)
    assert [(r.activity, r.step, r.loss) for r in seen] == [
        ("training", 8, 1.5),
        ("evaluating", 8, 1.5),
        ("evaluating", 8, 1.5),
        ("training", 9, 1.5),
    ]
    assert seen[-1].last_checkpoint_step == 8
    Reporter(tmp_path, enabled=False, hooks=[seen.append]).alive("loading")  # ranks but 0 report nothing
    assert len(seen) == 4


def test_a_failing_hook_does_not_stop_training(tmp_path, caplog):
    def broken(progress):
        raise RuntimeError("ConfigMap patch failed")

    Reporter(tmp_path, enabled=True, hooks=[broken]).progress(format_progress(1, 2, 0.0, None, None, None, None))
    assert "progress hook" in caplog.text


def test_only_rank_0_reports(tmp_path, capsys):
    reporter = Reporter(tmp_path, enabled=False)
    reporter.metric_line({"step": 1, "loss": 2.0})
    reporter.progress(format_progress(1, 2, 0.0, None, None, None, None))
    assert capsys.readouterr().out == "" and not (tmp_path / "progress.json").exists()


def test_metric_lines_are_json_on_stdout(tmp_path, capsys):
    Reporter(tmp_path, enabled=True).metric_line({"step": 3, "loss": 1.5, "mfu": None, "grad_norm": float("nan")})
    assert json.loads(capsys.readouterr().out) == {"step": 3, "loss": 1.5, "mfu": None, "grad_norm": None}


def test_metrics_json_has_the_contracted_keys(tmp_path):
    RunSummary(
        global_step=5,
        total_steps=5,
        epoch=1.0,
        train_loss=1.0,
        final_loss=0.9,
        train_samples_per_second=2.0,
        train_tokens_per_second=3.0,
        train_supervised_tokens_per_second=1.0,
        train_runtime_seconds=4.0,
        restarts=1,
        resumed_from_step=3,
        world_size=2,
        precision="fp32",
        trainable_parameters=10,
        total_parameters=100,
        padding_fraction=0.01,
    ).write(tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in (
        "global_step",
        "train_loss",
        "train_samples_per_second",
        "train_tokens_per_second",
        "train_runtime_seconds",
        "restarts",
        "resumed_from_step",
    ):
        assert key in metrics


def test_termination_message_goes_to_the_env_path_on_one_line(tmp_path):
    path = tmp_path / "termination.log"
    write_termination_message("done: step 5/5,\ncheckpoint x", {"FINETUNE_TERMINATION_LOG": str(path)})
    assert path.read_text() == "done: step 5/5, checkpoint x\n"


def test_termination_message_without_a_writable_default_is_skipped(tmp_path):
    write_termination_message("done", {})  # /dev/termination-log does not exist outside a pod: no error


def test_flops_count_lora_as_4n_plus_attention():
    flops = FlopsModel(body_params=1000, head_params=100, layers=2, hidden=8, head_on_targets_only=True)
    # 10 tokens in 2 rows padded to 6, 4 supervised
    assert (
        flops.step_flops(tokens=10, supervised=4, padded=12, samples=2)
        == 4 * 1000 * 10 + 4 * 100 * 4 + 6 * 2 * 8 * 6 * 10  # causal attention: half of a full s x s
    )


def test_no_mfu_on_cpu():
    assert peak_flops(torch.device("cpu"), "bf16") is None


def test_counts_add_and_loss():
    total = Counts()
    total.add(Counts(loss_sum=6.0, samples=2, tokens=10, supervised=3, padded=12))
    assert total.loss == 2.0 and Counts().loss is None
