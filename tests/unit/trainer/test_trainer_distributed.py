"""Reading the pod env, the per-pod launcher's env and exit code, and waiting for rank 0."""

from __future__ import annotations

import logging
import socket
import threading

import pytest

from finetune_trainer.config import ConfigError
from finetune_trainer.distributed import (
    LaunchEnv,
    RendezvousTimeout,
    StoppedWhileWaiting,
    launch_env_from_environ,
    pod_exit_code,
    wait_for_master,
    worker_environ,
)


def pod_env(node_rank: int, nnodes: int, nproc: int) -> dict[str, str]:
    """What the operator sets (like Kubeflow's PyTorchJob)."""
    env = {
        "MASTER_ADDR": "job-worker-0.job.ns.svc",
        "MASTER_PORT": "29500",
        "WORLD_SIZE": str(nnodes * nproc),
        "NNODES": str(nnodes),
        "NODE_RANK": str(node_rank),
        "NPROC_PER_NODE": str(nproc),
    }
    if nproc == 1:
        env["RANK"] = str(node_rank)
    env.update(
        {
            f"PET_{k}": v
            for k, v in env.items()
            if k in ("MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK", "NPROC_PER_NODE")
        }
    )
    return env


def test_no_env_means_one_process():
    env = launch_env_from_environ({})
    assert (env.rank, env.world_size, env.local_rank, env.needs_local_launch) == (0, 1, 0, False)


def test_one_process_pods():
    env = launch_env_from_environ(pod_env(node_rank=2, nnodes=3, nproc=1))
    assert (env.rank, env.world_size, env.local_rank, env.needs_local_launch) == (2, 3, 0, False)
    assert (env.master_addr, env.master_port) == ("job-worker-0.job.ns.svc", 29500)


def test_only_pet_variables_are_enough():
    env = launch_env_from_environ(
        {"PET_NNODES": "2", "PET_NODE_RANK": "1", "PET_MASTER_ADDR": "m", "PET_MASTER_PORT": "1234"}
    )
    assert (env.rank, env.world_size, env.master_addr, env.master_port) == (1, 2, "m", 1234)


def test_multi_gpu_pods_launch_their_processes_with_global_ranks():
    environ = pod_env(node_rank=1, nnodes=2, nproc=4)
    env = launch_env_from_environ(environ)
    assert env.needs_local_launch and env.world_size == 8
    children = [worker_environ(environ, env, local_rank, f"/tmp/t{local_rank}") for local_rank in range(4)]
    assert [c["RANK"] for c in children] == ["4", "5", "6", "7"]
    assert [c["LOCAL_RANK"] for c in children] == ["0", "1", "2", "3"]
    assert {c["WORLD_SIZE"] for c in children} == {"8"} and {c["LOCAL_WORLD_SIZE"] for c in children} == {"4"}
    assert children[0]["MASTER_ADDR"] == "job-worker-0.job.ns.svc"
    child = launch_env_from_environ(children[3])
    assert (child.rank, child.local_rank, child.world_size, child.needs_local_launch) == (7, 3, 8, False)


def test_the_pod_of_rank_0_reaches_it_over_loopback():
    environ = pod_env(node_rank=0, nnodes=2, nproc=2)
    child = worker_environ(environ, launch_env_from_environ(environ), 1, "/tmp/t")
    assert child["MASTER_ADDR"] == "127.0.0.1" and child["RANK"] == "1"


def test_torchrun_env_is_used_as_is():
    env = launch_env_from_environ(
        {
            "RANK": "3",
            "LOCAL_RANK": "1",
            "WORLD_SIZE": "4",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "h",
            "MASTER_PORT": "29400",
            "TORCHELASTIC_RUN_ID": "x",
            "PET_NPROC_PER_NODE": "2",
        }
    )
    assert (env.rank, env.local_rank, env.world_size, env.under_torchrun, env.needs_local_launch) == (
        3,
        1,
        4,
        True,
        False,
    )


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 is outside WORLD_SIZE=2"),
        (
            {"NNODES": "2", "NPROC_PER_NODE": "2", "WORLD_SIZE": "3"},
            "WORLD_SIZE=3 does not equal NNODES=2 x NPROC_PER_NODE=2",
        ),
    ],
)
def test_inconsistent_env_is_a_config_error(environ, message):
    with pytest.raises(ConfigError, match=message):
        launch_env_from_environ(environ)


@pytest.mark.parametrize(
    ("codes", "stopping", "expected"),
    [
        ([0, 0], False, 0),
        ([2, -15], False, 2),  # a bad config anywhere is permanent
        ([143, 143], True, 143),
        ([0, 143], True, 143),
        ([1, -15], False, 1),
        ([-9, -15], False, 137),  # killed by SIGKILL: retryable, reported as a shell would
    ],
)
def test_pod_exit_code(codes, stopping, expected):
    assert pod_exit_code(codes, stopping) == expected


def test_wait_for_master_returns_once_the_port_listens():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    listening = threading.Event()

    def listen_later():
        with socket.socket() as server:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind(("127.0.0.1", port))
            server.listen()
            listening.set()
            server.settimeout(10)
            server.accept()[0].close()

    timer = threading.Timer(0.3, listen_later)  # rank 0 comes up after the worker
    timer.start()
    wait_for_master("127.0.0.1", port, timeout_s=10)
    assert listening.is_set()
    timer.join()


def test_wait_for_master_gives_up_naming_what_it_waited_for(caplog):
    caplog.set_level(logging.INFO, logger="finetune_trainer")
    with pytest.raises(RendezvousTimeout, match=r"does-not-exist\.invalid does not resolve"):
        wait_for_master("does-not-exist.invalid", 29500, timeout_s=0.5, log_every_s=0.1)
    assert "waiting for rank 0" in caplog.text
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(RendezvousTimeout, match=f"127.0.0.1:{port} does not accept connections"):
        wait_for_master("127.0.0.1", port, timeout_s=0.3)


def test_a_stop_request_ends_the_wait():
    with pytest.raises(StoppedWhileWaiting):
        wait_for_master("does-not-exist.invalid", 29500, timeout_s=60, should_stop=lambda: True)


def test_launch_env_defaults():
    assert LaunchEnv().needs_local_launch is False
