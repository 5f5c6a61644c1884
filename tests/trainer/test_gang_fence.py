"""Fencing of the process group (issue 24): a process of an older attempt that reaches the new gang's rank 0
(a zombie whose pod was force-deleted but whose containers still run) cannot take a rank in the new gang,
because the group's keys in rank 0's store carry the attempt's run id (FINETUNE_RUN_ID). Real processes and
torch.distributed's own TCPStore and gloo, on loopback."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys

import torch.distributed as dist

from tests.trainer.harness import REPO, free_port, wait_for

JOIN = """
import sys, torch, torch.distributed as dist
from finetune_trainer.distributed import init_distributed, launch_env_from_environ
init_distributed(launch_env_from_environ())
token = torch.tensor([int(sys.argv[1])])
dist.all_reduce(token)
print("joined", int(token), flush=True)
"""


def start_rank(rank: int, run_id: str, attempt: int, port: int) -> subprocess.Popen[str]:
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
        "FINETUNE_COLLECTIVE_TIMEOUT": "60",
    }
    return subprocess.Popen(
        [sys.executable, "-c", JOIN, str(attempt)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
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
