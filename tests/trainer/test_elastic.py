"""The pod's elastic agent (FINETUNE_RESTART_STRATEGY=InPlace) with real processes on CPU: two "pods" are two agent
processes on 127.0.0.1, each starting its worker, as in a FineTuneJob of two CPU workers.

A killed worker restarts the gang in place (the agents live on) and the run ends with the adapter of an
uninterrupted run; a permanent error is never restarted; with no restart left the pod exits as its worker did.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from finetune_trainer.checkpoint import list_checkpoints
from tests.trainer.harness import Workers, free_port, wait_for, worker_env, write_config
from tests.trainer.test_trainer_multiprocess import TOTAL_STEPS, assert_same_adapter, checkpoint_exists, metrics


def start_gang(config: Path | list[Path], tmp_path: Path, attempt: str, **extra: str) -> Workers:
    """Two pods' agents, as the operator starts them with the InPlace strategy."""
    port = free_port()
    in_place = {
        "FINETUNE_RESTART_STRATEGY": "InPlace",
        "FINETUNE_RUN_ID": f"uid-{attempt}-3",
        "FINETUNE_ATTEMPT": "3",
        "FINETUNE_MAX_IN_PLACE_RESTARTS": "3",
        "FINETUNE_RESTARTS_SPENT": "0",
        "FINETUNE_RESTART_BACKOFF_SECONDS": "0",
        "FINETUNE_MAX_RESTART_BACKOFF_SECONDS": "0",
        **extra,
    }
    envs = [worker_env(rank, 2, port, tmp_path, **in_place) for rank in range(2)]
    return Workers(config, envs, tmp_path / "logs", attempt)


def worker_of(agent: subprocess.Popen) -> psutil.Process | None:
    """The agent's training process, if it runs: the child of its fork server (the agent's own children are the
    fork server and multiprocessing's resource tracker)."""
    processes = psutil.Process(agent.pid).children(recursive=True)
    return next((p for p in processes if p.ppid() != agent.pid), None)


def progress(output_dir: Path) -> dict:
    return json.loads((output_dir / "progress.json").read_text())


@pytest.fixture(scope="module")
def reference(tiny_model, tiny_data, tmp_path_factory) -> Path:
    """An uninterrupted gang under the agents: its output dir."""
    tmp = tmp_path_factory.mktemp("reference")
    config = write_config(tmp / "config.yaml", tiny_model, tiny_data, tmp / "out")
    with start_gang(config, tmp, "reference") as gang:
        assert gang.wait(150) == [0, 0], gang.stderr(0)[-3000:]
    for rank in range(2):
        assert (tmp / f"termination-{rank}.log").read_text().startswith(f"done: step {TOTAL_STEPS}/{TOTAL_STEPS}")
    return tmp / "out"


def test_the_agents_train_with_todays_ranks_and_report_the_attempt(reference):
    summary = metrics(reference)
    assert summary["global_step"] == TOTAL_STEPS and summary["world_size"] == 2 and summary["restarts"] == 0
    report = progress(reference)
    assert report["attempt"] == 3 and report["inPlaceRestarts"] == []


def test_a_killed_worker_restarts_the_gang_in_place_and_loses_nothing(reference, tiny_model, tiny_data, tmp_path):
    output_dir = tmp_path / "out"
    config = write_config(tmp_path / "config.yaml", tiny_model, tiny_data, output_dir)
    with start_gang(config, tmp_path, "kill") as gang:
        wait_for(checkpoint_exists(output_dir, 4), 120, "the first checkpoint")
        victim = worker_of(gang.procs[1])
        assert victim is not None
        victim.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        wait_for(lambda: (w := worker_of(gang.procs[1])) is not None and w.pid != victim.pid, 60, "a new worker")
        restarted_in = time.monotonic() - killed_at
        assert [proc.poll() for proc in gang.procs] == [None, None], "the agents (the pods) must live on"
        assert gang.wait(150) == [0, 0], gang.stderr(1)[-3000:]

    assert_same_adapter(output_dir, reference)
    summary = metrics(output_dir)
    assert summary["restarts"] == 1 and summary["resumed_from_step"] >= 4
    restarts = progress(output_dir)["inPlaceRestarts"]
    assert len(restarts) == 1, restarts
    assert restarts[0]["index"] == 1 and restarts[0]["rank"] == 1 and restarts[0]["exitCode"] == 137
    log = gang.stderr(1)
    assert "rank 1 (pod " in log and "exited 137 (SIGKILL): restarting the gang in place, restart 1 of 3, in 0 s" in log
    assert restarted_in < 10, f"the gang took {restarted_in:.1f} s to start a new worker"


def test_a_permanent_error_ends_every_pod_with_exit_2_and_no_restart(tiny_model, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    config = write_config(tmp_path / "config.yaml", tiny_model, data, tmp_path / "out")
    with start_gang(config, tmp_path, "permanent") as gang:
        assert gang.wait(120) == [2, 2], gang.stderr(0)[-3000:]
    for rank in range(2):
        assert "restarting the gang" not in gang.stderr(rank)
        assert 'train.jsonl:2: missing "output"' in (tmp_path / f"termination-{rank}.log").read_text()


def test_with_no_restart_left_the_pod_exits_as_its_killed_worker(tiny_model, tiny_data, tmp_path):
    output_dir = tmp_path / "out"
    config = write_config(tmp_path / "config.yaml", tiny_model, tiny_data, output_dir)
    with start_gang(config, tmp_path, "budget", FINETUNE_MAX_IN_PLACE_RESTARTS="0") as gang:
        wait_for(checkpoint_exists(output_dir, 4), 120, "the first checkpoint")
        victim = worker_of(gang.procs[1])
        assert victim is not None
        victim.send_signal(signal.SIGKILL)
        codes = gang.wait(90)
    assert codes[1] == 137 and codes[0] not in (0, 2, 143), codes
    message = (tmp_path / "termination-1.log").read_text()
    assert "rank 1 (pod " in message and "exited 137 (SIGKILL)" in message
    assert "restarting the gang" not in gang.stderr(0) + gang.stderr(1)


def test_sigterm_to_one_pod_checkpoints_and_stops_the_gang_without_a_restart(tiny_model, tiny_data, tmp_path):
    output_dir = tmp_path / "out"
    config = write_config(tmp_path / "config.yaml", tiny_model, tiny_data, output_dir)
    with start_gang(config, tmp_path, "sigterm") as gang:
        wait_for(checkpoint_exists(output_dir, 4), 120, "the first checkpoint")
        gang.procs[1].send_signal(signal.SIGTERM)  # the kubelet stops pod 1: its agent forwards it
        assert gang.wait(90) == [143, 143], gang.stderr(1)[-3000:]
    stopped_at = list_checkpoints(output_dir / "checkpoints")[0][0]
    assert f"stopped by SIGTERM at step {stopped_at}/" in (tmp_path / "termination-1.log").read_text()
    assert f"stopped by a peer at step {stopped_at}/" in (tmp_path / "termination-0.log").read_text()
    assert "restarting the gang" not in gang.stderr(0) + gang.stderr(1)


def test_one_pod_with_two_processes_under_the_agent_matches_two_pods(reference, tiny_model, tiny_data, tmp_path):
    """NPROC_PER_NODE=2: the agent starts both processes, with the ranks two one-process pods have."""
    output_dir = tmp_path / "out"
    config = write_config(tmp_path / "config.yaml", tiny_model, tiny_data, output_dir)
    env = worker_env(0, 1, free_port(), tmp_path, NPROC_PER_NODE="2", PET_NPROC_PER_NODE="2", WORLD_SIZE="2")
    del env["RANK"]
    env.update(FINETUNE_RESTART_STRATEGY="InPlace", FINETUNE_RUN_ID="uid-pod-1", FINETUNE_ATTEMPT="1")
    with Workers(config, [env], tmp_path / "logs", "pod") as pod:
        assert pod.wait(150) == [0], pod.stderr(0)[-3000:]
    assert_same_adapter(output_dir, reference)
    assert (tmp_path / "termination-0.log").read_text().startswith(f"done: step {TOTAL_STEPS}/{TOTAL_STEPS}")


def test_sigterm_before_the_gang_met_exits_143_at_once(tiny_model, tiny_data, tmp_path):
    """Pod 1 waiting for pod 0, pod 0 waiting in the rendezvous for pod 1 (two gangs of which only one pod runs)."""
    config = write_config(tmp_path / "config.yaml", tiny_model, tiny_data, tmp_path / "out")
    lone = [start_gang(config, tmp_path / f"lone-{rank}", f"lone-{rank}") for rank in (0, 1)]
    pods = [lone[0].procs[0], lone[1].procs[1]]
    for gang in lone:  # the other pod of each gang never runs
        gang.procs[1 - lone.index(gang)].kill()
    try:
        wait_for(lambda: "elastic agent of node 0" in lone[0].stderr(0), 60, "pod 0's agent to host the rendezvous")
        wait_for(lambda: "waiting for rank 0" in lone[1].stderr(1), 60, "pod 1's agent to wait for pod 0")
        for pod in pods:
            pod.send_signal(signal.SIGTERM)
        assert [pod.wait(30) for pod in pods] == [143, 143]
    finally:
        for gang in lone:
            gang.kill()
    assert "stopped by SIGTERM" in (tmp_path / "lone-0" / "termination-0.log").read_text()
    assert "stopped while waiting for rank 0" in (tmp_path / "lone-1" / "termination-1.log").read_text()
