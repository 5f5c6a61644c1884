"""Issue 12's trainer features on the tiny model: gradient checkpointing that recomputes, packing that keeps
examples apart, token-budget micro-batches, the attention choice, and exact resume with all of them."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from finetune_trainer.batching import Collator, MicroBatchOrder, pack_rows
from finetune_trainer.config import ConfigError, TrainerConfig
from finetune_trainer.data import IGNORE_INDEX, Example, load_training_data
from finetune_trainer.entrypoint import run
from finetune_trainer.model import (
    SupervisedLoss,
    load_model,
    resolve_attn_implementation,
    resolve_precision,
)
from finetune_trainer.tiny import make_tiny_dataset, make_tiny_model
from tests.trainer.harness import write_config

CPU = torch.device("cpu")
FP32 = resolve_precision("fp32", CPU)


@pytest.fixture(scope="module")
def four_layer_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("four-layers"), num_layers=4)


def config(model, data, **training) -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "model": str(model),
            "dataset": {"path": str(data)},
            "outputDir": "/tmp/unused",
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targetModules": ["q_proj", "v_proj", "down_proj"]},
            "training": training,
        }
    )


def load(model, data, tokenizer, attn="sdpa", **training):
    torch.manual_seed(0)
    peft_model = load_model(config(model, data, **training), tokenizer, FP32, CPU, None, attn)
    with torch.no_grad():  # LoRA B starts at zero; make the adapter matter for the comparisons below
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return peft_model


def inputs(batch):
    return {k: v for k, v in batch.items() if k != "counts"}


def loss_and_grads(peft_model, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    loss = SupervisedLoss(peft_model, causal=True)(**inputs(batch))
    loss.backward()
    grads = [p.grad.clone() for p in peft_model.parameters() if p.requires_grad]
    peft_model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.fixture(scope="module")
def examples(tiny_data, tokenizer):
    return load_training_data(tiny_data, "alpaca", tokenizer, 256).examples


# --- gradient checkpointing --------------------------------------------------------------------------


def layer_forward_counts(peft_model, batch) -> list[int]:
    """How often each decoder layer's input norm started in one forward and backward: 2 where it was recomputed.

    (A pre-hook inside the layer: the layer's own hooks stay outside the checkpoint, and torch stops a
    recomputation as soon as it has the tensors the backward needs, before some modules finish. The input
    norm, not self_attn: the last layer on targets calls the attention's projections directly.)"""
    layers = peft_model.get_base_model().model.layers
    counts = [0] * len(layers)
    handles = [
        layer.input_layernorm.register_forward_pre_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
        for i, layer in enumerate(layers)
    ]
    try:
        loss_and_grads(peft_model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return counts


@pytest.mark.parametrize(
    ("training", "expected"),
    [
        ({}, [1, 1, 1, 1]),
        ({"gradientCheckpointing": True}, [2, 2, 2, 2]),
        ({"gradientCheckpointing": True, "gradientCheckpointingEveryNLayers": 2}, [2, 1, 2, 1]),
    ],
)
def test_gradient_checkpointing_recomputes_the_chosen_layers_and_only_when_on(
    four_layer_model, tiny_data, tokenizer, examples, training, expected
):
    peft_model = load(four_layer_model, tiny_data, tokenizer, **training)
    assert peft_model.training  # from_pretrained's eval mode would silently skip the recomputation
    batch = Collator(tokenizer.pad_token_id, causal=True)(examples[:4])
    assert layer_forward_counts(peft_model, batch) == expected


def test_gradient_checkpointing_changes_no_gradient(four_layer_model, tiny_data, tokenizer, examples):
    batch = Collator(tokenizer.pad_token_id, causal=True)(examples[:4])
    plain = loss_and_grads(load(four_layer_model, tiny_data, tokenizer), batch)
    recomputed = loss_and_grads(load(four_layer_model, tiny_data, tokenizer, gradientCheckpointing=True), batch)
    torch.testing.assert_close(recomputed, plain)


# --- packing -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("one_row", [False, True])
def test_packed_and_unpacked_give_the_same_loss_and_lora_gradients(
    tiny_model, tiny_data, tokenizer, examples, attn, one_row
):
    peft_model = load(tiny_model, tiny_data, tokenizer, attn)
    chosen = examples[:10]
    unpacked = Collator(tokenizer.pad_token_id, causal=True)(chosen)
    packed = Collator(tokenizer.pad_token_id, causal=True, pack_to=512, one_row=one_row)(chosen)
    assert packed["input_ids"].shape[0] < unpacked["input_ids"].shape[0]  # several examples share a row
    assert packed["counts"]["supervised"] == unpacked["counts"]["supervised"]
    loss, grads = loss_and_grads(peft_model, unpacked)
    packed_loss, packed_grads = loss_and_grads(peft_model, packed)
    torch.testing.assert_close(packed_loss, loss, rtol=1e-5, atol=1e-4)
    for ours, reference in zip(packed_grads, grads, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
    # Without the restarting position ids the examples would attend to each other: another loss.
    crossed = {k: v for k, v in inputs(packed).items() if k != "position_ids"}
    with torch.no_grad():
        assert (SupervisedLoss(peft_model, causal=True)(**crossed) - loss).abs() > 1e-3


def test_the_collator_packs_rows_with_restarting_positions_and_per_example_targets():
    examples = [
        Example([1, 10, 11], [IGNORE_INDEX, 10, 11]),
        Example([1, 20], [IGNORE_INDEX, 20]),
        Example([1, 30, 31, 32], [IGNORE_INDEX, IGNORE_INDEX, 31, 32]),
    ]
    batch = Collator(pad_token_id=0, causal=True, pack_to=5)(examples)
    assert batch["input_ids"].tolist() == [[1, 10, 11, 1, 20], [1, 30, 31, 32, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert "attention_mask" not in batch
    # targets never cross from one example into the next: row 0's position 2 (last of example 0) has none
    assert batch["supervised_index"].tolist() == [0, 1, 3, 6, 7]
    assert batch["targets"].tolist() == [10, 11, 20, 31, 32]
    assert batch["counts"] == {"samples": 3, "tokens": 9, "supervised": 5, "padded": 10}


def test_one_row_packing_gives_flash_attention_the_example_boundaries():
    examples = [Example([1, 10, 11], [IGNORE_INDEX, 10, 11]), Example([1, 20], [IGNORE_INDEX, 20])]
    batch = Collator(pad_token_id=0, causal=True, pad_to_multiple_of=8, pack_to=5, one_row=True)(examples)
    assert batch["input_ids"].tolist() == [[1, 10, 11, 1, 20, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert batch["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_k"].tolist() == [0, 3, 5, 8]
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == 3


def test_pack_rows_is_next_fit_in_order():
    assert pack_rows([3, 2, 4, 1, 5], capacity=5) == [[0, 1], [2, 3], [4]]


# --- token budgets -----------------------------------------------------------------------------------


@pytest.fixture
def lengths():
    import random

    rng = random.Random(0)
    return [rng.randint(5, 200) for _ in range(300)]


@pytest.mark.parametrize("pack_to", [None, 200])
def test_token_budget_micro_batches_hold_every_example_once_within_the_budget(lengths, pack_to):
    order = MicroBatchOrder(lengths, 8, seed=1, max_tokens=600, pack_to=pack_to)
    for epoch in range(2):
        batches = order.epoch(epoch)
        assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
        assert order.count(epoch) == len(batches)
        for batch in batches:
            if pack_to is None:
                padded = len(batch) * max(lengths[i] for i in batch)
            else:
                rows = pack_rows([lengths[i] for i in batch], pack_to)
                assert all(sum(lengths[batch[p]] for p in row) <= pack_to for row in rows)
                padded = len(rows) * max(sum(lengths[batch[p]] for p in row) for row in rows)
            assert padded <= 600
    # fixed by the seed alone, so every rank (whatever the world size) sees the same micro-batches
    assert MicroBatchOrder(lengths, 8, seed=1, max_tokens=600, pack_to=pack_to).epoch(1) == order.epoch(1)


def test_a_budget_below_the_longest_example_names_both_fields(tiny_model, tiny_data):
    with pytest.raises(ValueError, match="maxTokensPerBatch 100 is below maxSeqLength 256"):
        config(tiny_model, tiny_data, maxTokensPerBatch=100, maxSeqLength=256)


# --- attention -----------------------------------------------------------------------------------------


def test_attention_auto_is_sdpa_on_cpu_and_flash_attention_needs_a_gpu():
    assert resolve_attn_implementation("auto", CPU, FP32) == "sdpa"
    assert resolve_attn_implementation("eager", CPU, FP32) == "eager"
    with pytest.raises(ConfigError, match=r"training\.attnImplementation: flash_attention_2 needs"):
        resolve_attn_implementation("flash_attention_2", CPU, FP32)


# --- the whole recipe: exact resume with packing and token budgets -------------------------------------


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    """Short examples (20-60 tokens), so that several share a packed row of 128."""
    return make_tiny_dataset(tmp_path_factory.mktemp("text") / "train.jsonl", "text", 160, max_items=4)


@pytest.mark.parametrize(
    "training",
    [
        {"packing": True, "batchSize": 2, "maxSeqLength": 128},
        {"maxTokensPerBatch": 600, "maxSeqLength": 128},
        {"packing": True, "maxTokensPerBatch": 384, "maxSeqLength": 128, "gradientCheckpointing": True},
    ],
    ids=["packing", "token-budget", "packing-token-budget-checkpointing"],
)
def test_resume_is_exact_with_packing_and_token_budgets(tmp_path, tiny_model, text_data, training):
    reference = tmp_path / "reference"
    config_file = write_config(
        tmp_path / "config.yaml",
        tiny_model,
        text_data,
        reference,
        format="text",
        maxSteps=10,
        checkpoint={"intervalSteps": 4, "keepLast": 3},
        **training,
    )
    assert run(str(config_file)) == 0
    metrics = json.loads((reference / "metrics.json").read_text())
    assert metrics["attn_implementation"] == "sdpa" and metrics["global_step"] == 10

    resumed = tmp_path / "resumed"  # the run as if killed after its step-4 checkpoint
    shutil.copytree(reference / "checkpoints" / "step-4", resumed / "checkpoints" / "step-4")
    resumed_config = tmp_path / "resumed.yaml"
    resumed_config.write_text(config_file.read_text().replace(str(reference), str(resumed)))
    assert run(str(resumed_config)) == 0
    assert json.loads((resumed / "metrics.json").read_text())["resumed_from_step"] == 4

    from safetensors.torch import load_file

    ours = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    theirs = load_file(str(reference / "adapter" / "adapter_model.safetensors"))
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-6
