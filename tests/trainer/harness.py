"""Helpers for the trainer tests: a tiny offline model and data, configs, and trainer processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
TRAINER_SRC = REPO / "trainer"
if str(TRAINER_SRC) not in sys.path:
    sys.path.insert(0, str(TRAINER_SRC))

from finetune_trainer.tiny import make_tiny_dataset, make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny-data") / "train.jsonl", "alpaca", 96)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(
    path: Path,
    model: Path,
    data: Path,
    output_dir: Path,
    *,
    format: str = "alpaca",
    task: str = "causal-lm",
    lora: dict | None = None,
    checkpoint: dict | None = None,
    **training,
) -> Path:
    """A trainer config file as the operator writes it (camelCase keys); training fields as keywords."""
    config = {
        "model": str(model),
        "task": task,
        "dataset": {"path": str(data), "format": format},
        "lora": lora or {"r": 4, "alpha": 8, "dropout": 0.1, "targetModules": ["q_proj", "v_proj", "o_proj"]},
        "training": {
            "maxSteps": 18,
            "batchSize": 4,
            "gradientAccumulationSteps": 2,
            "learningRate": 3e-3,
            "warmupSteps": 2,
            "logEverySteps": 3,
            "seed": 7,
            **training,
        },
        "checkpoint": checkpoint or {"intervalSteps": 4, "keepLast": 2},
        "outputDir": str(output_dir),
    }
    path.write_text(yaml.safe_dump(config))
    return path


def worker_env(rank: int, world_size: int, port: int, log_dir: Path, **extra: str) -> dict[str, str]:
    """The env the operator gives pod `rank` of `world_size` one-process pods."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(TRAINER_SRC), env.get("PYTHONPATH")])),
        OMP_NUM_THREADS="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world_size),
        NNODES=str(world_size),
        NODE_RANK=str(rank),
        RANK=str(rank),
        NPROC_PER_NODE="1",
        PET_MASTER_ADDR="127.0.0.1",
        PET_MASTER_PORT=str(port),
        PET_NNODES=str(world_size),
        PET_NODE_RANK=str(rank),
        PET_NPROC_PER_NODE="1",
        FINETUNE_TERMINATION_LOG=str(log_dir / f"termination-{rank}.log"),
        FINETUNE_RENDEZVOUS_TIMEOUT="60",
        FINETUNE_COLLECTIVE_TIMEOUT="120",
    )
    env.update(extra)
    return env


class Workers:
    """Trainer processes of one attempt; their stdout/stderr go to files in log_dir."""

    def __init__(self, config: Path | list[Path], envs: list[dict[str, str]], log_dir: Path, attempt: str):
        """config: one file for all ranks, or one per rank (what each pod sees)."""
        log_dir.mkdir(parents=True, exist_ok=True)
        self.logs = [log_dir / f"{attempt}-{i}" for i in range(len(envs))]
        self.procs = []
        configs = config if isinstance(config, list) else [config] * len(envs)
        for env, log, config in zip(envs, self.logs, configs, strict=True):
            with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "finetune_trainer", "--config", str(config)],
                        env=env,
                        stdout=out,
                        stderr=err,
                    )
                )

    def wait(self, timeout: float = 120) -> list[int]:
        deadline = time.monotonic() + timeout
        codes = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(f"trainer processes still running after {timeout} s; logs: {self.logs}")
        return codes

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *_: object) -> None:
        self.kill()

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def stderr(self, i: int) -> str:
        return Path(f"{self.logs[i]}.err").read_text()

    def stdout(self, i: int) -> str:
        return Path(f"{self.logs[i]}.out").read_text()


@pytest.fixture
def start_workers(tmp_path) -> Callable[..., Workers]:
    started: list[Workers] = []

    def start(config: Path | list[Path], world_size: int = 2, attempt: str = "a", **extra: str) -> Workers:
        port = free_port()
        envs = [worker_env(rank, world_size, port, tmp_path, **extra) for rank in range(world_size)]
        workers = Workers(config, envs, tmp_path / "logs", attempt)
        started.append(workers)
        return workers

    yield start
    for workers in started:
        workers.kill()


def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.01) -> None:
    """Poll condition until it holds; fail the test naming `what` after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
