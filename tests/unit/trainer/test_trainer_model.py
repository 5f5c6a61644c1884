"""Model loading, precision, LoRA targets, the loss module, token-normalised accumulation, schedules."""

from __future__ import annotations

import pytest
import torch

from finetune_trainer.batching import Collator
from finetune_trainer.config import ConfigError, TrainerConfig
from finetune_trainer.data import load_training_data
from finetune_trainer.loop import accumulate_gradients
from finetune_trainer.model import (
    SupervisedLoss,
    default_target_modules,
    load_model,
    make_optimizer,
    make_scheduler,
    resolve_precision,
)

CPU = torch.device("cpu")


def config(tiny_model, tiny_data, **lora) -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "model": str(tiny_model),
            "dataset": {"path": str(tiny_data)},
            "outputDir": "/tmp/unused",
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, **lora},
        }
    )


@pytest.fixture(scope="module")
def examples(tiny_data, tokenizer):
    return load_training_data(tiny_data, "alpaca", tokenizer, 256).examples


@pytest.fixture
def peft_model(tiny_model, tiny_data, tokenizer):
    torch.manual_seed(0)
    model = load_model(config(tiny_model, tiny_data), tokenizer, resolve_precision("fp32", CPU), CPU, None)
    with torch.no_grad():  # LoRA B starts at zero; make the adapter matter for the comparisons below
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return model


def test_precision_on_cpu():
    assert resolve_precision("auto", CPU).name == "fp32"
    assert resolve_precision("bf16", CPU).autocast_dtype == torch.bfloat16
    assert not resolve_precision("fp32", CPU).needs_grad_scaler
    with pytest.raises(ConfigError, match=r"training\.precision: fp16 needs a CUDA GPU"):
        resolve_precision("fp16", CPU)


def test_only_the_adapter_trains(peft_model):
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert default_target_modules(peft_model.get_base_model()) == ["q_proj", "v_proj"]


def test_unknown_target_modules_name_the_field(tiny_model, tiny_data, tokenizer):
    with pytest.raises(ConfigError, match=r"lora\.targetModules"):
        load_model(
            config(tiny_model, tiny_data, targetModules=["nope_proj"]),
            tokenizer,
            resolve_precision("fp32", CPU),
            CPU,
            None,
        )


def test_missing_model_path_names_the_field(tmp_path, tiny_data, tokenizer):
    bad = config(tmp_path / "no-model", tiny_data)
    with pytest.raises(ConfigError, match=r"model: path .*no-model does not exist"):
        load_model(bad, tokenizer, resolve_precision("fp32", CPU), CPU, None)


def test_head_on_targets_only_gives_the_full_logits_loss(peft_model, examples, tokenizer):
    batch = Collator(tokenizer.pad_token_id, causal=True)(examples[:4])
    inputs = {k: v for k, v in batch.items() if k != "counts"}
    fast = SupervisedLoss(peft_model, causal=True)
    assert fast.head_on_targets_only
    slow = SupervisedLoss(peft_model, causal=True)
    slow.head_on_targets_only = False
    torch.testing.assert_close(fast(**inputs), slow(**inputs))
    # The textbook version: full logits, labels padded with -100, shifted by one.
    logits = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = torch.full(batch["input_ids"].shape, -100)
    for row, example in enumerate(examples[:4]):
        labels[row, : len(example.labels)] = torch.tensor(example.labels)
    reference = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum"
    )
    torch.testing.assert_close(fast(**inputs), reference)


def gradients(model) -> list[torch.Tensor]:
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return grads


def test_accumulation_weighs_every_supervised_token_equally(peft_model, examples, tokenizer):
    """Two micro-batches of different token counts give the gradient of the one big batch."""
    collate = Collator(tokenizer.pad_token_id, causal=True)
    short, long = examples[:1], sorted(examples[1:12], key=lambda e: -len(e.input_ids))[:3]
    loss_module = SupervisedLoss(peft_model, causal=True)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    parts = [collate(short), collate(long)]
    total = sum(part["counts"]["supervised"] for part in parts)
    accumulate_gradients(loss_module, parts, total, 1, CPU, None, scaler)
    accumulated = gradients(peft_model)
    accumulate_gradients(loss_module, [collate(short + long)], total, 1, CPU, None, scaler)
    whole = gradients(peft_model)
    for a, b in zip(accumulated, whole, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # The per-micro-batch mean (HF Trainer's old behaviour) would give a different gradient.
    for part in parts:
        accumulate_gradients(loss_module, [part], part["counts"]["supervised"] * 2, 1, CPU, None, scaler)
    mean_of_means = gradients(peft_model)
    assert max((a - b).abs().max() for a, b in zip(mean_of_means, whole, strict=False)) > 1e-4


def test_optimizer_skips_decay_on_vectors(peft_model):
    optimizer = make_optimizer(peft_model, 1e-3, weight_decay=0.1)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.1]


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("constant", [0.0, 0.5, 1.0, 1.0, 1.0]),
        ("linear", [0.0, 0.5, 1.0, 0.5, 0.0]),
        ("cosine", [0.0, 0.5, 1.0, 0.5, 0.0]),
    ],
)
def test_schedules_warm_up_then_decay(kind, expected):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = make_scheduler(optimizer, kind, warmup_steps=2, total_steps=4)
    factors = []
    for _ in range(5):
        factors.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert factors == pytest.approx(expected, abs=1e-9)
