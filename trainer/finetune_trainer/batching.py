"""Batches: a resumable, length-grouped order of micro-batches shared by all ranks, and their collation.

Each epoch has one global list of micro-batches, fixed by (seed, epoch, batch size) and independent of the
world size: the examples are shuffled, sorted by length within windows of WINDOW_BATCHES micro-batches
(so a micro-batch holds examples of similar length and padding is small), cut into micro-batches, and the
micro-batches shuffled. An optimizer step consumes the next `accumulation x world_size` micro-batches, the
rank taking every world_size-th. The data position is (epoch, micro-batches consumed), so a resume
continues exactly there, and a resume with another world size continues from the same sample.
The micro-batches left at the end of an epoch, fewer than one step needs, are skipped (each epoch's
shuffle leaves out others). torch's DistributedSampler can do neither of the above: it restarts epochs
from their beginning and pads a short epoch by repeating examples.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .data import IGNORE_INDEX, Example

WINDOW_BATCHES = 64


@dataclass
class DataPosition:
    epoch: int = 0
    micro_batch: int = 0  # micro-batches of this epoch consumed by all ranks together


class MicroBatchOrder:
    """The global micro-batches of every epoch (lists of example indices), the same on every rank."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group_by_length: bool = True):
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self._epochs: dict[int, list[list[int]]] = {}

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def epoch(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epochs:
            self._epochs = {epoch: self._build_epoch(epoch)}  # only the current epoch is ever asked for twice
        return self._epochs[epoch]

    def _build_epoch(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        window = WINDOW_BATCHES * self.batch_size if self.group_by_length else len(order)
        batches: list[list[int]] = []
        for start in range(0, len(order), window):
            chunk = order[start : start + window]
            if self.group_by_length:
                chunk.sort(key=lambda i: -self.lengths[i])  # stable: ties keep the shuffled order
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        if self.group_by_length:
            shuffle = torch.randperm(len(batches), generator=generator).tolist()
            batches = [batches[i] for i in shuffle]
        return batches


class RankBatches(torch.utils.data.Sampler):
    """A rank's micro-batches from a position to the end of its epoch, whole optimizer steps only."""

    def __init__(self, order: MicroBatchOrder, position: DataPosition, accumulation: int, world_size: int, rank: int):
        self.order = order
        self.position = DataPosition(position.epoch, position.micro_batch)
        self.stride = accumulation * world_size
        self.accumulation = accumulation
        self.world_size = world_size
        self.rank = rank

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.order.epoch(self.position.epoch)
        for start in range(self.position.micro_batch, len(batches) - self.stride + 1, self.stride):
            for micro in range(self.accumulation):
                yield batches[start + micro * self.world_size + self.rank]

    def __len__(self) -> int:
        return max(0, (len(self.order) - self.position.micro_batch) // self.stride) * self.accumulation


def steps_per_epoch(order: MicroBatchOrder, accumulation: int, world_size: int) -> int:
    return len(order) // (accumulation * world_size)


def advance(position: DataPosition, order: MicroBatchOrder, stride: int) -> DataPosition:
    """The position after one optimizer step of `stride` micro-batches (moving to the next epoch as needed)."""
    position = start_of_step(position, order, stride)
    return DataPosition(position.epoch, position.micro_batch + stride)


def start_of_step(position: DataPosition, order: MicroBatchOrder, stride: int) -> DataPosition:
    """Where the next step reads: here, or the next epoch's start when this one has no whole step left."""
    if position.micro_batch + stride > len(order):
        return DataPosition(position.epoch + 1, 0)
    return position


def total_steps(
    epochs: float,
    max_steps: int | None,
    order: MicroBatchOrder,
    stride: int,
    done: int = 0,
    position: DataPosition | None = None,
) -> int:
    """Optimizer steps of the whole run: maxSteps, or enough to cover `epochs` passes over the data.

    From a resume (`done` steps at `position`) the remaining steps are counted with the current stride,
    which matters when the world size changed since the checkpoint.
    """
    if max_steps is not None:
        return max_steps
    per_epoch = len(order) // stride
    position = position or DataPosition()
    remaining, epoch, offset = 0, position.epoch, position.micro_batch
    while epoch < epochs:
        in_this_epoch = math.ceil(min(1.0, epochs - epoch) * per_epoch - 1e-9)
        remaining += max(0, in_this_epoch - math.ceil(offset / stride))
        epoch, offset = epoch + 1, 0
    return done + remaining


class Collator:
    """Pads a micro-batch on the right to its longest example and lists the trained positions.

    The attention mask is only included when there is padding.

    For causal LMs, targets[b, t] is the token at t + 1 (already shifted), and supervised_index lists the
    flattened positions that have a target, so the loss only evaluates the LM head there.
    Also returns plain counts (samples, tokens, supervised, padded) so no step has to read them off a GPU.
    """

    def __init__(self, pad_token_id: int, causal: bool, pad_to_multiple_of: int = 1):
        self.pad_token_id = pad_token_id
        self.causal = causal
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: list[Example]) -> dict[str, Any]:
        longest = max(len(example.input_ids) for example in examples)
        width = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, example in enumerate(examples):
            input_ids[row, : len(example.input_ids)] = torch.tensor(example.input_ids)
            attention_mask[row, : len(example.input_ids)] = 1
        # Without padding the mask says nothing the causal attention does not: leaving it out lets SDPA
        # take its fused causal path (and spares transformers a device-side "is it all ones?" check).
        batch = {"input_ids": input_ids}
        if width * len(examples) != sum(len(example.input_ids) for example in examples):
            batch["attention_mask"] = attention_mask
        tokens = sum(len(example.input_ids) for example in examples)
        if self.causal:
            targets = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
            for row, example in enumerate(examples):
                targets[row, : len(example.labels) - 1] = torch.tensor(example.labels[1:])
            supervised_index = (targets.flatten() != IGNORE_INDEX).nonzero().squeeze(1)
            batch["supervised_index"] = supervised_index
            batch["targets"] = targets.flatten().index_select(0, supervised_index)
            supervised = len(supervised_index)
        else:
            batch["targets"] = torch.tensor([example.labels for example in examples], dtype=torch.long)
            supervised = len(examples)
        batch["counts"] = {
            "samples": len(examples),
            "tokens": tokens,
            "supervised": supervised,
            "padded": input_ids.numel(),
        }
        return batch


def make_loader(
    examples: list[Example], sampler: RankBatches, collator: Collator, on_gpu: bool
) -> torch.utils.data.DataLoader:
    """A DataLoader over one epoch's rank batches: workers and pinned memory on GPU, inline on CPU.

    It gets a generator of its own: a DataLoader draws a seed from the global RNG for every iterator,
    which would make dropout after a resume differ from an uninterrupted run.
    """
    return torch.utils.data.DataLoader(
        examples,
        batch_sampler=sampler,
        collate_fn=collator,
        num_workers=2 if on_gpu else 0,
        pin_memory=on_gpu,
        generator=torch.Generator().manual_seed(0),
    )
