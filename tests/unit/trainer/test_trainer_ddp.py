"""DDP over the adapters only: the frozen base is not broadcast at a gang's start, the adapters are."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from finetune_trainer.distributed import DistContext
from finetune_trainer.loop import _wrap_ddp


class Adapted(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.base = torch.nn.Linear(4, 4)
        self.base.requires_grad_(False)
        self.adapter = torch.nn.Linear(4, 4, bias=False)
        self.register_buffer("table", torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.base(x) + self.adapter(x) + self.table).sum()


def _rank(rank: int, init_file: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)  # every tensor differs between the ranks before DDP
        module = Adapted()
        module.table.fill_(rank)
        ddp = _wrap_ddp(module, DistContext(rank, 2, rank, torch.device("cpu")))
        ddp(torch.ones(2, 4) * (rank + 1)).backward()
        results[rank] = {
            "base": module.base.weight.detach().clone(),
            "table": module.table.clone(),
            "adapter": module.adapter.weight.detach().clone(),
            "grad": module.adapter.weight.grad.clone(),
        }
    finally:
        dist.destroy_process_group()


def test_ddp_broadcasts_and_reduces_the_adapters_and_leaves_the_frozen_base_and_buffers_alone(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
    zero, one = results[0], results[1]
    assert torch.equal(zero["adapter"], one["adapter"])  # rank 0's adapters everywhere
    assert torch.equal(zero["grad"], one["grad"])  # gradients averaged
    assert torch.allclose(zero["grad"], torch.full((4, 4), 3.0))  # inputs of ones and twos: mean 1.5 x 2 rows
    assert not torch.equal(zero["base"], one["base"])  # not broadcast: each rank keeps what it loaded
    assert (zero["table"].tolist(), one["table"].tolist()) == ([0.0] * 4, [1.0] * 4)
