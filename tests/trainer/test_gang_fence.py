"""The process group against old and hung ranks (issue 24), with real processes and torch.distributed's own
TCPStore and gloo on loopback. A process of an older attempt that reaches the new gang's rank 0 (a zombie
whose pod was force-deleted but whose containers still run) cannot take a rank in the new gang: the group's
keys in rank 0's store carry the attempt's run id (FINETUNE_RUN_ID). A collective waiting for a hung peer
times out (FINETUNE_COLLECTIVE_TIMEOUT) with an error the trainer tells apart."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys

import torch.distributed as dist

from tests.trainer.harness import REPO, free_port, wait_for

JOIN = """
import sys, torch, torch.distributed as dist
from finetune_trainer.distributed import init_distributed, launch_env_from_environ, shutdown
ctx = init_distributed(launch_env_from_environ())
token = torch.tensor([int(sys.argv[1])])
dist.all_reduce(token)
print("joined", int(token), flush=True)
shutdown(ctx)  # as the trainer ends
"""


def start_rank(
    rank: int, run_id: str, attempt: int, port: int, script: str = JOIN, collective_timeout: int = 60
) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO / "trainer"),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": "2",
        "NNODES": "2",
        "NODE_RANK": str(rank),
        "RANK": str(rank),
        "NPROC_PER_NODE": "1",
        "FINETUNE_RUN_ID": run_id,
        "FINETUNE_RENDEZVOUS_TIMEOUT": "60",
        "FINETUNE_COLLECTIVE_TIMEOUT": str(collective_timeout),
    }
    return subprocess.Popen(
        [sys.executable, "-c", script, str(attempt)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_a_rank_of_an_older_attempt_cannot_join_the_new_gang():
    port = free_port()
    new_rank_0 = start_rank(0, "uid-2", 2, port)
    zombie = new_rank_1 = None
    try:
        # A client of rank 0's store, to see when each process has written its keys there.
        probe = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=120))
        registered = probe.num_keys()  # rank 0 writes its keys only once a rank 1 has come
        zombie = start_rank(1, "uid-1", 1, port)  # attempt 1's rank 1, still running
        wait_for(lambda: probe.num_keys() > registered, 120, "the older attempt's rank 1 to reach the store")
        new_rank_1 = start_rank(1, "uid-2", 2, port)
        out_0, _ = new_rank_0.communicate(timeout=120)
        out_1, _ = new_rank_1.communicate(timeout=120)
        # Each process adds its attempt: 2 + 2 is the new gang; 2 + 1 would be rank 0 paired with the zombie.
        assert "joined 4" in out_0 and new_rank_0.returncode == 0, out_0
        assert "joined 4" in out_1 and new_rank_1.returncode == 0, out_1
        zombie.kill()
        zombie_out, _ = zombie.communicate(timeout=30)
        assert "joined" not in zombie_out, zombie_out
    finally:
        for process in (new_rank_0, zombie, new_rank_1):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


STALL = """
import sys, time, torch, torch.distributed as dist
from finetune_trainer.distributed import collective_timed_out, init_distributed, launch_env_from_environ
ctx = init_distributed(launch_env_from_environ())
if ctx.rank == 1:
    time.sleep(120)  # a hung rank: alive and silent
try:
    dist.all_reduce(torch.ones(1))
except Exception as error:
    print("timed out" if collective_timed_out(error) else f"other: {error!r}", flush=True)
"""


def test_a_collective_waiting_for_a_hung_peer_times_out_and_is_told_apart():
    """FINETUNE_COLLECTIVE_TIMEOUT bounds the wait for a silent peer, and the error is told apart from others:
    the trainer then exits 3 (PEER_STALLED) and the restart's reason is Stalled."""
    port = free_port()
    ranks = [start_rank(rank, "uid-1", 1, port, script=STALL, collective_timeout=3) for rank in (0, 1)]
    try:
        out, _ = ranks[0].communicate(timeout=120)
        assert "timed out" in out, out
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
                process.wait()
