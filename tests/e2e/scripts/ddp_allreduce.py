"""A torchrun-style DDP script of our own, to run through a FineTuneJob's `spec.command` unchanged:

    python ddp_allreduce.py        # one process per worker: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    torchrun ddp_allreduce.py      # torchrun takes --nnodes, --node-rank, ... from the PET_* variables

Every process joins a gloo process group and all-reduces its rank + 1; rank 0 gathers what each saw and
writes it to <output>/ddp-result-rank-<rank>.json (only worker-0 mounts the job's storage, as with a
ReadWriteOnce claim), where <output> is $DDP_OUTPUT_DIR, else the `outputDir` of the
trainer config in $FINETUNE_CONFIG (the job's storage, wherever the operator or `finetune local`
put it), else the working directory. Only the standard library and torch: no finetune package.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import socket
from pathlib import Path

import torch
import torch.distributed as dist


def output_dir() -> Path:
    if os.environ.get("DDP_OUTPUT_DIR"):
        return Path(os.environ["DDP_OUTPUT_DIR"])
    config = os.environ.get("FINETUNE_CONFIG")
    if config and Path(config).exists():
        # The config is YAML written by the operator; one top-level `outputDir: ...` line is all we need.
        match = re.search(r"^outputDir:\s*['\"]?([^'\"\n]+)", Path(config).read_text(), re.MULTILINE)
        if match:
            return Path(match.group(1).strip())
    return Path.cwd()


def main() -> int:
    # torchrun sets RANK for every process it starts; without torchrun the launcher (the operator, one
    # process per pod) gives RANK too. Both give WORLD_SIZE, MASTER_ADDR and MASTER_PORT, which the
    # default env:// init method reads.
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group(
        "gloo", init_method="env://", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=120)
    )
    try:
        value = torch.tensor([float(rank + 1)])
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        gathered: list[object] = [None] * world_size
        dist.all_gather_object(gathered, socket.gethostname())
        result = {
            "rank": rank,
            "world_size": world_size,
            "sum": value.item(),
            "hostnames": gathered,
            "master_addr": os.environ["MASTER_ADDR"],
            "under_torchrun": "TORCHELASTIC_RUN_ID" in os.environ,
        }
        print(json.dumps(result), flush=True)
        results: list[dict] = [{}] * world_size
        dist.all_gather_object(results, result)
        if rank == 0:
            folder = output_dir()
            folder.mkdir(parents=True, exist_ok=True)
            for seen in results:
                (folder / f"ddp-result-rank-{seen['rank']}.json").write_text(json.dumps(seen) + "\n")
        dist.barrier()  # nobody leaves (and tears its pod down) before rank 0 has written
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
