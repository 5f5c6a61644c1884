"""The micro-batch order: deterministic, complete, length-grouped, resumable, world-size independent."""

from __future__ import annotations

import random

import pytest
import torch

from finetune_trainer.batching import (
    Collator,
    DataPosition,
    MicroBatchOrder,
    RankBatches,
    advance,
    pack_first_fit,
    pack_rows,
    start_of_step,
    total_steps,
)
from finetune_trainer.data import IGNORE_INDEX, Example


@pytest.fixture
def lengths():
    rng = random.Random(0)
    return [rng.randint(5, 200) for _ in range(300)]


def padding_fraction(order: MicroBatchOrder, lengths: list[int], epoch: int = 0) -> float:
    batches = order.epoch(epoch)
    real = sum(lengths[i] for batch in batches for i in batch)
    padded = sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)
    return 1 - real / padded


def test_each_epoch_covers_every_example_once_in_a_new_order(lengths):
    order = MicroBatchOrder(lengths, batch_size=8, seed=1)
    epochs = [order.epoch(e) for e in range(2)]
    for batches in epochs:
        assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
        assert len(batches) == order.count(0) == 38
    assert epochs[0] != epochs[1]
    assert MicroBatchOrder(lengths, 8, seed=1).epoch(0) == epochs[0]  # the same on every rank


def test_grouping_by_length_cuts_padding(lengths):
    grouped = padding_fraction(MicroBatchOrder(lengths, 8, 1, group_by_length=True), lengths)
    random_order = padding_fraction(MicroBatchOrder(lengths, 8, 1, group_by_length=False), lengths)
    assert grouped < 0.1 < 0.3 < random_order


def test_ranks_split_each_step_and_a_resume_continues_exactly(lengths):
    order = MicroBatchOrder(lengths, 4, seed=3)
    accumulation, world = 2, 3
    stride = accumulation * world
    per_rank = [list(RankBatches(order, DataPosition(), accumulation, world, rank)) for rank in range(world)]
    global_batches = order.epoch(0)
    steps = len(global_batches) // stride
    assert all(len(batches) == steps * accumulation for batches in per_rank)
    for step in range(steps):  # step s takes the next `stride` micro-batches, interleaved over ranks
        taken = [per_rank[r][step * accumulation + m] for m in range(accumulation) for r in range(world)]
        assert taken == global_batches[step * stride : (step + 1) * stride]
    resumed = list(RankBatches(order, DataPosition(0, 5 * stride), accumulation, world, 1))
    assert resumed == per_rank[1][5 * accumulation :]


def test_position_moves_to_the_next_epoch_when_no_whole_step_is_left(lengths):
    order = MicroBatchOrder(lengths, 8, seed=0)  # 38 micro-batches
    assert start_of_step(DataPosition(0, 36), order, 4) == DataPosition(1, 0)
    assert advance(DataPosition(0, 32), order, 4) == DataPosition(0, 36)
    assert advance(DataPosition(0, 36), order, 4) == DataPosition(1, 4)


@pytest.mark.parametrize(
    ("epochs", "expected"),
    [(1, 9), (2, 18), (1.5, 14), (0.1, 1)],  # 38 micro-batches, 4 per step -> 9 steps per epoch
)
def test_total_steps_from_epochs(lengths, epochs, expected):
    order = MicroBatchOrder(lengths, 8, seed=0)
    assert total_steps(epochs, None, order, stride=4) == expected
    assert total_steps(epochs, 7, order, stride=4) == 7


def test_total_steps_after_a_world_size_change_counts_the_remaining_data(lengths):
    order = MicroBatchOrder(lengths, 8, seed=0)
    # 2 epochs; 5 steps of stride 4 done (20 micro-batches), now stride 2: 9 left in epoch 0, 19 in epoch 1.
    assert total_steps(2, None, order, stride=2, done=5, position=DataPosition(0, 20)) == 5 + 9 + 19


def test_collator_shifts_targets_and_lists_supervised_positions():
    examples = [
        Example([1, 10, 11, 12, 2], [IGNORE_INDEX, IGNORE_INDEX, 11, 12, 2]),
        Example([1, 20, 2], [IGNORE_INDEX, 20, 2]),
    ]
    batch = Collator(pad_token_id=0, causal=True)(examples)
    assert batch["input_ids"].tolist() == [[1, 10, 11, 12, 2], [1, 20, 2, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    # position t predicts the token at t + 1: row 0 positions 1, 2, 3; row 1 positions 0, 1
    assert batch["supervised_index"].tolist() == [1, 2, 3, 5, 6]
    assert batch["targets"].tolist() == [11, 12, 2, 20, 2]
    assert batch["counts"] == {"samples": 2, "tokens": 8, "supervised": 5, "padded": 10}


def test_collator_for_classification_and_padding_multiple():
    batch = Collator(pad_token_id=0, causal=False, pad_to_multiple_of=8)([Example([1, 5, 6], 1), Example([1, 7], 0)])
    assert batch["input_ids"].shape == (2, 8)
    assert torch.equal(batch["targets"], torch.tensor([1, 0]))
    assert batch["counts"]["supervised"] == 2


def test_collator_leaves_out_the_mask_when_nothing_is_padded():
    batch = Collator(pad_token_id=0, causal=True)([Example([1, 5, 6], [-100, 5, 6]), Example([1, 7, 8], [-100, 7, 8])])
    assert "attention_mask" not in batch and batch["counts"]["padded"] == batch["counts"]["tokens"] == 6


@pytest.mark.parametrize(
    "settings",
    [
        {"batch_size": 8},
        {"batch_size": 8, "group_by_length": False},
        {"batch_size": 8, "max_tokens": 600},
        {"batch_size": 4, "pack_to": 256},
        {"batch_size": 8, "token_cap": 700},
    ],
)
def test_the_largest_micro_batch_comes_first_in_every_epoch(lengths, settings):
    order = MicroBatchOrder(lengths, seed=5, **settings)
    for epoch in range(3):
        batches = order.epoch(epoch)
        sizes = [order.padded_tokens(batch) for batch in batches]
        assert sizes[0] == max(sizes) > min(sizes)
        assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))


def test_a_token_cap_keeps_batch_size_and_cuts_micro_batches_that_would_exceed_it(lengths):
    capped = MicroBatchOrder(lengths, 8, seed=1, token_cap=700).epoch(0)
    assert max(len(batch) for batch in capped) == 8
    assert all(len(batch) * max(lengths[i] for i in batch) <= 700 for batch in capped)
    assert any(len(batch) < 8 for batch in capped)
    short = [min(length, 80) for length in lengths]  # under the cap: exactly the uncapped order
    assert MicroBatchOrder(short, 8, seed=1, token_cap=700).epoch(0) == MicroBatchOrder(short, 8, seed=1).epoch(0)


def test_first_fit_decreasing_fills_rows_better_than_next_fit_and_the_collator_finds_its_rows(lengths):
    capacity = 256
    first_fit = pack_first_fit(lengths, capacity)
    next_fit = pack_rows(lengths, capacity)
    assert sorted(p for row in first_fit for p in row) == list(range(len(lengths)))
    assert all(sum(lengths[p] for p in row) <= capacity for row in first_fit)
    assert len(first_fit) < len(next_fit)
    assert sum(lengths) / (len(first_fit) * capacity) > 0.95
    order = MicroBatchOrder(lengths, 4, seed=2, pack_to=capacity)
    assert order.fill_rate() > 0.9
    for batch in order.epoch(0):  # the collator splits a micro-batch into the very rows packing made
        rows = pack_rows([lengths[i] for i in batch], capacity)
        assert len(rows) <= 4
        assert order.padded_tokens(batch) == len(rows) * max(sum(lengths[batch[p]] for p in row) for row in rows)
    for start in range(len(first_fit)):  # any run of consecutive rows, listed as packed, splits back the same
        run = first_fit[start : start + 5]
        flat = [p for row in run for p in row]
        split = [[flat[p] for p in row] for row in pack_rows([lengths[p] for p in flat], capacity)]
        assert split == run
