"""Batches: a resumable, length-grouped order of micro-batches shared by all ranks, and their collation.

Each epoch has one global list of micro-batches, fixed by (seed, epoch, batch settings) and independent of
the world size: the examples are shuffled, sorted by length within windows of WINDOW_BATCHES x batchSize
examples (so a micro-batch holds examples of similar length and padding is small), cut into micro-batches,
and the micro-batches shuffled. A micro-batch is batchSize examples, or with training.maxTokensPerBatch as
many as fit in that many tokens, padding included (long examples make short micro-batches and short ones
long, so every micro-batch costs about the same); on a GPU without maxTokensPerBatch, batchSize examples
cut earlier where they would exceed the memory budget (memory.py). With training.packing the shuffled
examples are first packed into rows of up to maxSeqLength tokens (first fit decreasing) and the rows are
what micro-batches are made of. The micro-batch with the most tokens comes first in every epoch, so one
that does not fit in memory fails in the first minute, not at a random step on every attempt.
An optimizer step consumes the next `accumulation x world_size` micro-batches, the rank taking
every world_size-th. The data position is (epoch, micro-batches consumed), so a resume continues exactly
there, and a resume with another world size continues from the same sample.
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


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Next fit: the positions of `lengths`, in order, cut into rows of at most `capacity` tokens.

    The collator splits a packed micro-batch back into its rows with this: pack_first_fit lists rows so
    that next fit finds the same rows again."""
    rows: list[list[int]] = []
    used = 0
    for position, length in enumerate(lengths):
        if not rows or used + length > capacity:
            rows.append([])
            used = 0
        rows[-1].append(position)
        used += length
    return rows


def pack_first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """First fit decreasing: each position, longest first, goes into the first row with room for it.

    Rows fill better than with next fit (a short example goes back to fill an earlier row). Rows come in
    the order they were opened, each listing its positions longest first; an example never fits a row
    opened before its own (first fit tried it there, and rows only fill up), so pack_rows over any run of
    consecutive rows gives the same rows. A segment tree of the rows' room finds the first fit in log time.
    """
    order = sorted(range(len(lengths)), key=lambda p: -lengths[p])  # stable: ties keep their order
    size = 1
    while size < max(1, len(lengths)):
        size *= 2
    room = [0] * (2 * size)  # room[size + r]: free tokens of row r (0 for rows not opened yet)
    rows: list[list[int]] = []
    for position in order:
        length = lengths[position]
        if room[1] >= length:
            node = 1
            while node < size:  # descend to the leftmost row with room for it
                node = 2 * node if room[2 * node] >= length else 2 * node + 1
            row = node - size
        else:
            row = len(rows)
            rows.append([])
            node = size + row
            room[node] = capacity
        rows[row].append(position)
        room[node] -= length
        node //= 2
        while node:
            room[node] = max(room[2 * node], room[2 * node + 1])
            node //= 2
    return rows


class MicroBatchOrder:
    """The global micro-batches of every epoch (lists of example indices), the same on every rank.

    max_tokens: cut micro-batches by padded tokens instead of batch_size examples. token_cap: keep
    batch_size examples but cut a micro-batch earlier where it would exceed this many padded tokens (the
    GPU memory budget of memory.py). pack_to: pack the examples into rows of at most this many tokens;
    batch_size (or max_tokens) then counts rows. The micro-batch with the most padded tokens comes first
    in every epoch, so a batch that does not fit in memory fails at the first step, not at a random one.
    """

    def __init__(
        self,
        lengths: list[int],
        batch_size: int,
        seed: int,
        group_by_length: bool = True,
        max_tokens: int | None = None,
        pack_to: int | None = None,
        token_cap: int | None = None,
    ):
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length and pack_to is None  # packed rows are full anyway
        self.max_tokens = max_tokens
        self.pack_to = pack_to
        self.token_cap = token_cap
        self._epochs: dict[int, list[list[int]]] = {}
        self._counts: dict[int, int] = {}

    def count(self, epoch: int) -> int:
        """Micro-batches in `epoch` (the same for every epoch unless they are cut by tokens or packed)."""
        if epoch not in self._counts:
            self._counts[epoch] = len(self.epoch(epoch))
        return self._counts[epoch]

    def epoch(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epochs:
            self._epochs = {epoch: self._build_epoch(epoch)}  # only the current epoch is ever asked for twice
        return self._epochs[epoch]

    def _build_epoch(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        if self.pack_to is not None:
            rows = pack_first_fit([self.lengths[i] for i in order], self.pack_to)
            batches = self._cut([[order[p] for p in row] for row in rows])
        else:
            window = WINDOW_BATCHES * self.batch_size if self.group_by_length else len(order)
            batches = []
            for start in range(0, len(order), window):
                chunk = order[start : start + window]
                if self.group_by_length:
                    chunk.sort(key=lambda i: -self.lengths[i])  # stable: ties keep the shuffled order
                batches += self._cut([[i] for i in chunk])
        if self.group_by_length or self.pack_to is not None:
            shuffle = torch.randperm(len(batches), generator=generator).tolist()
            batches = [batches[i] for i in shuffle]
        largest = max(range(len(batches)), key=lambda b: self.padded_tokens(batches[b]), default=0)
        return batches[largest : largest + 1] + batches[:largest] + batches[largest + 1 :]

    def padded_tokens(self, batch: list[int]) -> int:
        """Tokens of a micro-batch as the collator pads it (rows of examples, or packed rows)."""
        lengths = [self.lengths[i] for i in batch]
        if self.pack_to is None:
            return len(lengths) * max(lengths, default=0)
        rows = pack_rows(lengths, self.pack_to)
        return len(rows) * max(sum(lengths[p] for p in row) for row in rows)

    def fill_rate(self, epoch: int = 0) -> float:
        """Real tokens over padded tokens of an epoch's micro-batches (packing: how full the rows are)."""
        batches = self.epoch(epoch)
        padded = sum(self.padded_tokens(batch) for batch in batches)
        return sum(self.lengths[i] for batch in batches for i in batch) / max(1, padded)

    def _cut(self, units: list[list[int]]) -> list[list[int]]:
        """Consecutive units (an example, or a packed row of them) into micro-batches of example indices."""
        limit = self.max_tokens or self.token_cap
        if limit is None:
            groups = [units[i : i + self.batch_size] for i in range(0, len(units), self.batch_size)]
        else:
            most = self.batch_size if self.max_tokens is None else len(units)
            groups, longest = [], 0
            for unit in units:
                tokens = sum(self.lengths[i] for i in unit)
                if not groups or len(groups[-1]) == most or (len(groups[-1]) + 1) * max(longest, tokens) > limit:
                    groups.append([])
                    longest = 0
                groups[-1].append(unit)
                longest = max(longest, tokens)
        return [[i for unit in group for i in unit] for group in groups]


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
        remaining = self.order.count(self.position.epoch) - self.position.micro_batch
        return max(0, remaining // self.stride) * self.accumulation


class StepBatches:
    """This rank's micro-batches one optimizer step at a time, from any data position; the DataLoader is
    kept open while steps follow each other and reopened where a step does not continue the last."""

    def __init__(
        self,
        examples: list[Example],
        order: MicroBatchOrder,
        collator: Collator,
        accumulation: int,
        world_size: int,
        rank: int,
        on_gpu: bool,
    ):
        self.examples = examples
        self.order = order
        self.collator = collator
        self.accumulation = accumulation
        self.world_size = world_size
        self.rank = rank
        self.on_gpu = on_gpu
        self.stride = accumulation * world_size
        self._batches: Iterator[dict[str, Any]] | None = None
        self._continues_at: DataPosition | None = None

    def take(self, position: DataPosition) -> tuple[list[dict[str, Any]], DataPosition]:
        """The micro-batches of the step at `position`, and the position after it."""
        start = start_of_step(position, self.order, self.stride)
        if self._batches is None or self._continues_at != start:
            sampler = RankBatches(self.order, start, self.accumulation, self.world_size, self.rank)
            self._batches = iter(make_loader(self.examples, sampler, self.collator, self.on_gpu))
        batches = [next(self._batches) for _ in range(self.accumulation)]
        self._continues_at = DataPosition(start.epoch, start.micro_batch + self.stride)
        return batches, self._continues_at


def steps_per_epoch(order: MicroBatchOrder, accumulation: int, world_size: int, epoch: int = 0) -> int:
    return order.count(epoch) // (accumulation * world_size)


def advance(position: DataPosition, order: MicroBatchOrder, stride: int) -> DataPosition:
    """The position after one optimizer step of `stride` micro-batches (moving to the next epoch as needed)."""
    position = start_of_step(position, order, stride)
    return DataPosition(position.epoch, position.micro_batch + stride)


def start_of_step(position: DataPosition, order: MicroBatchOrder, stride: int) -> DataPosition:
    """Where the next step reads: here, or the next epoch's start when this one has no whole step left."""
    while position.micro_batch + stride > order.count(position.epoch):
        position = DataPosition(position.epoch + 1, 0)
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
    position = position or DataPosition()
    remaining, epoch, offset = 0, position.epoch, position.micro_batch
    while epoch < epochs:
        per_epoch = order.count(epoch) // stride
        in_this_epoch = math.ceil(min(1.0, epochs - epoch) * per_epoch - 1e-9)
        remaining += max(0, in_this_epoch - math.ceil(offset / stride))
        epoch, offset = epoch + 1, 0
    return done + remaining


class Collator:
    """Pads a micro-batch on the right to its longest row and lists the trained positions.

    A row is one example, or with pack_to several examples packed as MicroBatchOrder packed them, with
    position ids restarting at each example (and at the padding), and no attention mask: transformers
    then keeps the examples apart (a block-diagonal causal mask, or flash attention's variable-length
    kernel). Right padding never needs a mask for a causal model's real tokens; it is still passed
    unpacked, where it spares the padded positions' work in some kernels, and left out when nothing is
    padded, which lets SDPA take its fused causal path.

    For causal LMs, targets[b, t] is the token at t + 1 of the same example (already shifted), and
    supervised_index lists the flattened positions that have a target, so the loss only evaluates the
    LM head there. Also returns plain counts (samples, tokens, supervised, padded) so no step has to read
    them off a GPU.

    one_row (with pack_to): the whole micro-batch as a single row, as flash attention's variable-length
    path in transformers wants it, with the examples' boundaries as cu_seq_lens_q/k and max_length_q/k
    (what transformers' DataCollatorWithFlattening gives it), so that no layer has to work them out of
    the position ids on the GPU.
    """

    def __init__(
        self,
        pad_token_id: int,
        causal: bool,
        pad_to_multiple_of: int = 1,
        pack_to: int | None = None,
        one_row: bool = False,
    ):
        self.pad_token_id = pad_token_id
        self.causal = causal
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pack_to = pack_to
        self.one_row = one_row and pack_to is not None

    def __call__(self, examples: list[Example]) -> dict[str, Any]:
        if self.one_row:
            rows = [examples]
        elif self.pack_to is not None:
            rows = [[examples[i] for i in row] for row in pack_rows([len(e.input_ids) for e in examples], self.pack_to)]
        else:
            rows = [[example] for example in examples]
        row_lengths = [sum(len(example.input_ids) for example in row) for row in rows]
        width = -(-max(row_lengths) // self.pad_to_multiple_of) * self.pad_to_multiple_of
        tokens = sum(row_lengths)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        for r, row in enumerate(rows):
            input_ids[r, : row_lengths[r]] = torch.tensor([t for example in row for t in example.input_ids])
        batch: dict[str, Any] = {"input_ids": input_ids}
        if self.pack_to is not None:
            segments = [[len(e.input_ids) for e in row] + [width - row_lengths[r]] for r, row in enumerate(rows)]
            batch["position_ids"] = torch.tensor([_positions(lengths) for lengths in segments])
            if self.one_row:
                lengths = [length for length in segments[0] if length]
                boundaries = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
                batch.update(cu_seq_lens_q=boundaries, cu_seq_lens_k=boundaries)
                batch.update(max_length_q=max(lengths), max_length_k=max(lengths))
        elif tokens != input_ids.numel():
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, length in enumerate(row_lengths):
                attention_mask[r, :length] = 1
            batch["attention_mask"] = attention_mask
        if self.causal:
            targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
            for r, row in enumerate(rows):
                shifted = [t for example in row for t in _shifted_token_labels(example)]
                targets[r, : len(shifted)] = torch.tensor(shifted)
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


def _shifted_token_labels(example: Example) -> list[int]:
    """A causal example's targets: each token predicts the next one, the last predicts nothing."""
    if isinstance(example.labels, int):
        raise TypeError("a causal-lm batch got a classification example (its labels are one class id)")
    return [*example.labels[1:], IGNORE_INDEX]


def _positions(lengths: list[int]) -> list[int]:
    return [p for length in lengths for p in range(length)]


def make_loader(
    examples: list[Example], sampler: RankBatches, collator: Collator, on_gpu: bool
) -> torch.utils.data.DataLoader:
    """A DataLoader over one epoch's rank batches: workers and pinned memory on GPU, inline on CPU.

    It gets a generator of its own: a DataLoader draws a seed from the global RNG for every iterator,
    which would make dropout after a resume differ from an uninterrupted run.
    """
    return torch.utils.data.DataLoader(
        examples,  # type: ignore[arg-type]  # torch annotates Dataset; a list is a valid map-style dataset
        batch_sampler=sampler,
        collate_fn=collator,
        num_workers=2 if on_gpu else 0,
        pin_memory=on_gpu,
        generator=torch.Generator().manual_seed(0),
    )
