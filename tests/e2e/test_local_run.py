"""`finetune local` for real: the same spec, env wiring and restart policy as on Kubernetes, as local
processes (no cluster). Worker pids come from OUTPUT/local-workers.json."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_dev.harness import wait_for
from tests.e2e.tiny_jobs import (
    TOTAL_STEPS,
    WORKERS,
    adapter_difference,
    checkpoint_steps,
    ddp_results,
    ddp_spec,
    manifest,
    metrics,
    tiny_spec,
)

pytestmark = pytest.mark.e2e

RUN_SECONDS = 240
EXACT = 1e-6
VENV_BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class LocalResult:
    code: int
    stdout: str
    stderr: str
    output: Path


def local_env() -> dict[str, str]:
    """The environment of a user whose virtualenv is active: `finetune`, `python` and `torchrun` are its."""
    return {**os.environ, "PATH": os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", os.defpath)])}


def finetune_local_command(job: dict[str, Any], folder: Path) -> list[str]:
    job_file = folder / "job.yaml"
    job_file.write_text(yaml.safe_dump(job, sort_keys=False))
    finetune = shutil.which("finetune", path=str(VENV_BIN)) or "finetune"
    return [finetune, "local", str(job_file), "--output-dir", str(folder / "out")]


def finetune_local(job: dict[str, Any], folder: Path, timeout: float = RUN_SECONDS) -> LocalResult:
    command = finetune_local_command(job, folder)
    done = subprocess.run(command, env=local_env(), capture_output=True, text=True, timeout=timeout)
    return LocalResult(done.returncode, done.stdout, done.stderr, folder / "out")


def worker_pid(output: Path, rank: int) -> int | None:
    try:
        return json.loads((output / "local-workers.json").read_text())[str(rank)]["pid"]
    except (OSError, ValueError, KeyError):
        return None


@pytest.fixture(scope="module")
def uninterrupted(tiny_assets, tmp_path_factory) -> LocalResult:
    return finetune_local(manifest(tiny_spec(tiny_assets)), tmp_path_factory.mktemp("uninterrupted"))


def test_finetune_local_trains_two_workers_and_prints_a_summary(uninterrupted):
    assert uninterrupted.code == 0, uninterrupted.stdout + uninterrupted.stderr
    out = uninterrupted.output
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    run_metrics = metrics(out)
    assert (run_metrics["global_step"], run_metrics["world_size"], run_metrics["restarts"]) == (TOTAL_STEPS, WORKERS, 0)
    assert "tiny: Succeeded after 0 restart(s)" in uninterrupted.stdout
    assert f"adapter:  {out / 'adapter'}" in uninterrupted.stdout
    assert "train_loss" in uninterrupted.stdout and "train_samples_per_second" in uninterrupted.stdout
    assert f"step {TOTAL_STEPS}/{TOTAL_STEPS}" in uninterrupted.stdout  # progress lines while it ran


def test_a_killed_worker_restarts_the_gang_and_gives_the_same_adapter(uninterrupted, tiny_assets, tmp_path):
    command = finetune_local_command(manifest(tiny_spec(tiny_assets)), tmp_path)
    out = tmp_path / "out"
    with subprocess.Popen(command, env=local_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as run:
        try:
            wait_for(lambda: checkpoint_steps(out) or run.poll() is not None, RUN_SECONDS, what="a first checkpoint")
            pid = worker_pid(out, 1)
            assert run.poll() is None and pid is not None, "the run ended before a worker could be killed"
            os.kill(pid, signal.SIGKILL)
            stdout, _ = run.communicate(timeout=RUN_SECONDS)
        finally:
            if run.poll() is None:
                run.send_signal(signal.SIGINT)  # stops the workers
                run.communicate(timeout=60)

    assert run.returncode == 0, stdout
    assert "tiny: Succeeded after 1 restart(s)" in stdout
    assert metrics(out)["restarts"] == 1
    assert adapter_difference(out, uninterrupted.output) <= EXACT


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"workers": 0}, "spec.workers"),
        ({"lora": {"r": 8, "dropout": 1.5}}, "spec.lora.dropout"),
        ({"training": {"learningRate": -1}}, "spec.training.learningRate"),
    ],
)
def test_a_bad_spec_exits_2_naming_the_field(tiny_assets, tmp_path, change, field):
    result = finetune_local(manifest({**tiny_spec(tiny_assets), **change}), tmp_path, timeout=60)

    assert result.code == 2
    assert field in result.stderr, result.stderr
    assert not (result.output / "local-workers.json").exists()  # refused before any worker started


@pytest.mark.parametrize("launcher", ["python", "torchrun"])
def test_our_own_ddp_script_runs_unchanged(tmp_path, launcher):
    result = finetune_local(manifest(ddp_spec(launcher), name="ddp"), tmp_path, timeout=120)

    assert result.code == 0, result.stdout + result.stderr
    assert "ddp: Succeeded after 0 restart(s)" in result.stdout
    results = ddp_results(result.output)
    assert [r["sum"] for r in results] == [3.0, 3.0] and [r["rank"] for r in results] == [0, 1]
    assert {r["under_torchrun"] for r in results} == {launcher == "torchrun"}


def test_workers_that_asked_for_a_gpu_on_a_machine_without_cuda_fail_at_once_spending_no_restart(tiny_assets, tmp_path):
    result = finetune_local(manifest({**tiny_spec(tiny_assets), "gpusPerWorker": 1}), tmp_path, timeout=120)

    output = result.stdout + result.stderr
    assert result.code != 0
    assert "spec.gpusPerWorker is 1 but this worker sees no CUDA device" in output, output
    assert "tiny: Failed after 0 restart(s)" in output, output
    assert not (result.output / "checkpoints").exists() or not any((result.output / "checkpoints").iterdir())
