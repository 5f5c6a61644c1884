"""The trainer under DDP on CPU (gloo), as the operator runs it: one process per pod, env-wired.

An uninterrupted 2-worker run is the reference; runs that are SIGKILLed or SIGTERMed and resumed must end
with the same adapter (max abs difference <= 1e-6) and the same metrics.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune_trainer.checkpoint import list_checkpoints, verify_checkpoint
from finetune_trainer.entrypoint import run
from tests.trainer.harness import Workers, free_port, wait_for, worker_env, write_config

TOTAL_STEPS = 18


def adapter_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output_dir / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(output_dir: Path, reference: Path, tolerance: float = 1e-6) -> None:
    ours, theirs = adapter_weights(output_dir), adapter_weights(reference)
    assert ours.keys() == theirs.keys()
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    assert worst <= tolerance, f"adapters differ by {worst}"


def metric_lines(text: str) -> dict[int, dict]:
    return {line["step"]: line for line in map(json.loads, text.splitlines())}


def metrics(output_dir: Path) -> dict:
    return json.loads((output_dir / "metrics.json").read_text())


def checkpoint_exists(output_dir: Path, step: int):
    return lambda: (output_dir / "checkpoints" / f"step-{step}").is_dir()


@pytest.fixture(scope="module")
def reference(tiny_model, tiny_data, tmp_path_factory) -> tuple[Path, dict[int, dict]]:
    """An uninterrupted run of 2 workers: its output dir and metric lines."""
    tmp = tmp_path_factory.mktemp("reference")
    config = write_config(tmp / "config.yaml", tiny_model, tiny_data, tmp / "out")
    port = free_port()
    workers = Workers(config, [worker_env(rank, 2, port, tmp) for rank in range(2)], tmp / "logs", "reference")
    assert workers.wait() == [0, 0], workers.stderr(0)[-3000:]
    return tmp / "out", metric_lines(workers.stdout(0))


def test_reference_run_writes_the_contracted_outputs(reference):
    output_dir, lines = reference
    summary = metrics(output_dir)
    assert summary["global_step"] == TOTAL_STEPS and summary["world_size"] == 2
    assert summary["restarts"] == 0 and not summary["resumed_from_step"]
    for key in ("train_loss", "train_samples_per_second", "train_tokens_per_second", "train_runtime_seconds"):
        assert summary[key] > 0
    assert sorted(lines) == [3, 6, 9, 12, 15, 18]
    assert [step for step, _ in list_checkpoints(output_dir / "checkpoints")] == [18, 16]  # keepLast 2


def test_sigkill_of_one_worker_then_resume_gives_the_same_adapter(
    reference, tiny_model, tiny_data, tmp_path, start_workers
):
    output_dir = tmp_path / "out"
    config = write_config(tmp_path / "config.yaml", tiny_model, tiny_data, output_dir)
    first = start_workers(config, attempt="first")
    wait_for(checkpoint_exists(output_dir, 4), 90, "the first checkpoint")
    first.procs[1].send_signal(signal.SIGKILL)
    codes = first.wait(60)
    assert codes[1] == -signal.SIGKILL
    assert codes[0] not in (0, 2, 143), "rank 0 must fail retryably when its peer dies"
    resume_step = list_checkpoints(output_dir / "checkpoints")[0][0]
    assert 4 <= resume_step < TOTAL_STEPS

    second = start_workers(config, attempt="second")
    assert second.wait() == [0, 0], second.stderr(0)[-3000:]
    assert_same_adapter(output_dir, reference[0])
    summary = metrics(output_dir)
    assert summary["restarts"] == 1 and summary["resumed_from_step"] == resume_step
    assert summary["train_loss"] == pytest.approx(metrics(reference[0])["train_loss"], abs=1e-9)


def test_sigterm_checkpoints_the_step_reached_and_loses_nothing(
    reference, tiny_model, tiny_data, tmp_path, start_workers
):
    output_dir = tmp_path / "out"
    config = write_config(tmp_path / "config.yaml", tiny_model, tiny_data, output_dir)
    first = start_workers(config, attempt="first")
    wait_for(checkpoint_exists(output_dir, 4), 90, "the first checkpoint")
    first.procs[1].send_signal(signal.SIGTERM)  # one pod preempted: both must stop together
    assert first.wait(60) == [143, 143]

    message = (tmp_path / "termination-0.log").read_text()
    stopped_at = int(re.search(r"stopped by a peer at step (\d+)/18", message).group(1))
    assert "stopped by SIGTERM at step" in (tmp_path / "termination-1.log").read_text()
    assert list_checkpoints(output_dir / "checkpoints")[0][0] == stopped_at
    verify_checkpoint(output_dir / "checkpoints" / f"step-{stopped_at}")
    progress = json.loads((output_dir / "progress.json").read_text())
    assert progress["lastCheckpointStep"] == stopped_at
    before = metric_lines(first.stdout(0))
    assert max(before, default=0) <= stopped_at
    shutil.copytree(output_dir, tmp_path / "stopped-copy")

    second = start_workers(config, attempt="second")
    assert second.wait() == [0, 0], second.stderr(0)[-3000:]
    assert_same_adapter(output_dir, reference[0])
    assert metrics(output_dir)["resumed_from_step"] == stopped_at
    after = metric_lines(second.stdout(0))
    assert min(after) > stopped_at, "a resumed run must not replay steps"
    reference_lines = reference[1]
    for step, line in {**before, **after}.items():
        assert line["loss"] == pytest.approx(reference_lines[step]["loss"], abs=1e-9), f"loss at step {step}"


def test_resume_with_fewer_workers_continues_with_a_warning(
    reference, tiny_model, tiny_data, tmp_path, caplog, monkeypatch
):
    """A 2-worker checkpoint resumed by 1 process: a warning, the position kept in samples, a finished run."""
    output_dir = tmp_path / "out"
    config = write_config(tmp_path / "config.yaml", tiny_model, tiny_data, output_dir)
    shutil.copytree(reference[0] / "checkpoints" / "step-16", output_dir / "checkpoints" / "step-16")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NPROC_PER_NODE", "NNODES", "NODE_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FINETUNE_TERMINATION_LOG", str(tmp_path / "termination.log"))
    assert run(str(config)) == 0
    assert "written by 2 processes, this run has 1" in caplog.text
    summary = metrics(output_dir)
    assert summary["global_step"] == TOTAL_STEPS and summary["world_size"] == 1 and summary["resumed_from_step"] == 16


def test_one_pod_with_two_processes_matches_two_pods(reference, tiny_model, tiny_data, tmp_path):
    """NPROC_PER_NODE=2: the trainer starts both processes itself, with the same ranks as two pods."""
    output_dir = tmp_path / "out"
    config = write_config(tmp_path / "config.yaml", tiny_model, tiny_data, output_dir)
    env = worker_env(0, 1, free_port(), tmp_path, NPROC_PER_NODE="2", PET_NPROC_PER_NODE="2", WORLD_SIZE="2")
    del env["RANK"]
    pod = Workers(config, [env], tmp_path / "logs", "pod")
    assert pod.wait() == [0], pod.stderr(0)[-3000:]
    assert_same_adapter(output_dir, reference[0])
    assert (tmp_path / "termination-0.log").read_text().startswith("done: step 18/18")


def test_packing_with_a_token_budget_resumes_exactly_and_does_not_depend_on_the_world_size(
    tiny_model, tmp_path, start_workers, monkeypatch
):
    """2 workers x 1 micro-batch and 1 process x 2 micro-batches take the same micro-batches per step."""
    from finetune_trainer.tiny import make_tiny_dataset

    data = make_tiny_dataset(tmp_path / "text.jsonl", "text", 160, max_items=4)
    evaluation = make_tiny_dataset(tmp_path / "eval.jsonl", "text", 7, seed=5)  # 4 + 3 over two ranks
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "targetModules": ["q_proj", "v_proj", "o_proj"]}
    budget = {"packing": True, "maxSeqLength": 128, "maxTokensPerBatch": 256, "maxSteps": 8}
    budget.update(lora=lora, format="text")

    def with_eval_set(config):
        config.write_text(config.read_text().replace("format: text", f"format: text\n  evalPath: {evaluation}"))
        return config

    two = tmp_path / "two"
    config = with_eval_set(
        write_config(tmp_path / "two.yaml", tiny_model, data, two, gradientAccumulationSteps=1, **budget)
    )
    workers = start_workers(config, attempt="two")
    assert workers.wait() == [0, 0], workers.stderr(0)[-3000:]

    resumed = tmp_path / "resumed"
    shutil.copytree(two / "checkpoints" / "step-4", resumed / "checkpoints" / "step-4")
    resumed_config = tmp_path / "resumed.yaml"
    resumed_config.write_text(config.read_text().replace(str(two), str(resumed)))
    again = start_workers(resumed_config, attempt="resumed")
    assert again.wait() == [0, 0], again.stderr(0)[-3000:]
    assert_same_adapter(resumed, two)
    assert metrics(resumed)["resumed_from_step"] == 4

    one = tmp_path / "one"
    config = with_eval_set(
        write_config(tmp_path / "one.yaml", tiny_model, data, one, gradientAccumulationSteps=2, **budget)
    )
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NPROC_PER_NODE", "NNODES", "NODE_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FINETUNE_TERMINATION_LOG", str(tmp_path / "termination.log"))
    assert run(str(config)) == 0
    assert_same_adapter(one, two, tolerance=1e-5)  # only the order of float sums differs
    # the eval set's 7 examples, split 4/3 over two ranks, each counted once: the 1-process figure
    assert metrics(two)["eval_loss"] == pytest.approx(metrics(one)["eval_loss"], rel=1e-5)


def _worker_configs(tmp_path: Path, model: Path, data: Path, rank1_model: Path | None = None) -> list[Path]:
    """Rank 0 sees the data set and the output claim; rank 1 (another pod on a ReadWriteOnce claim) sees
    neither: its dataset path does not exist and its output dir is an empty scratch dir of its own."""
    rank0 = write_config(tmp_path / "config-0.yaml", model, data, tmp_path / "out")
    (tmp_path / "scratch-1").mkdir()  # the operator's per-pod emptyDir at the output mount path
    rank1 = write_config(
        tmp_path / "config-1.yaml", rank1_model or model, tmp_path / "not-mounted" / data.name, tmp_path / "scratch-1"
    )
    return [rank0, rank1]


def test_only_rank_0_reads_the_data_set_and_the_adapter_is_the_same(
    reference, tiny_model, tiny_data, tmp_path, start_workers
):
    workers = start_workers(_worker_configs(tmp_path, tiny_model, tiny_data))
    assert workers.wait() == [0, 0], workers.stderr(1)[-3000:]
    assert_same_adapter(tmp_path / "out", reference[0])
    assert metrics(tmp_path / "out") == {**metrics(reference[0]), **_timings(metrics(tmp_path / "out"))}
    assert not (tmp_path / "not-mounted").exists() and not list((tmp_path / "scratch-1").iterdir())


def _timings(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k.endswith(("_per_second", "_seconds")) or k == "mfu"}


def test_a_data_error_seen_by_rank_0_ends_every_rank_with_exit_2(tiny_model, tmp_path, start_workers):
    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    workers = start_workers(_worker_configs(tmp_path, tiny_model, data))
    assert workers.wait(90) == [2, 2]
    for rank in range(2):
        assert 'train.jsonl:2: missing "output"' in (tmp_path / f"termination-{rank}.log").read_text()


def test_a_model_path_only_rank_0_can_read_ends_every_rank_with_exit_2(tiny_model, tiny_data, tmp_path, start_workers):
    workers = start_workers(_worker_configs(tmp_path, tiny_model, tiny_data, rank1_model=tmp_path / "unmounted-model"))
    assert workers.wait(90) == [2, 2]
    for rank in range(2):
        message = (tmp_path / f"termination-{rank}.log").read_text()
        assert "spec.model" in message and "rank 1 of 2" in message
