"""Issue 26's speed options give the same training: first-fit-decreasing packed micro-batches and adapters in
the compute dtype (same loss and LoRA gradients as the plain path, within the dtype's tolerance)."""

from __future__ import annotations

import pytest
import torch

from finetune_trainer.batching import Collator, MicroBatchOrder
from finetune_trainer.config import ConfigError
from finetune_trainer.data import load_training_data
from finetune_trainer.model import SupervisedLoss, load_model, resolve_precision
from tests.unit.trainer.test_trainer_model import config

CPU = torch.device("cpu")


def load(model, data, tokenizer, precision="fp32", **lora):
    torch.manual_seed(0)
    peft_model = load_model(
        config(model, data, **{"targetModules": ["all-linear"], **lora}),
        tokenizer,
        resolve_precision(precision, CPU),
        CPU,
        None,
    )
    with torch.no_grad():  # LoRA B starts at zero; make the adapter matter for the comparisons below
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    return peft_model


def loss_and_grads(peft_model, batch, autocast_dtype=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    inputs = {k: v for k, v in batch.items() if k != "counts"}
    with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = SupervisedLoss(peft_model, causal=True)(**inputs)
    loss.backward()
    grads = [p.grad.float().clone() for p in peft_model.parameters() if p.requires_grad]
    peft_model.zero_grad(set_to_none=True)
    return loss.detach().float(), grads


@pytest.fixture(scope="module")
def examples(tiny_data, tokenizer):
    return load_training_data(tiny_data, "alpaca", tokenizer, 256).examples


def test_first_fit_decreasing_packed_micro_batches_give_the_unpacked_loss_and_gradients(
    tiny_model, tiny_data, tokenizer, examples
):
    lengths = [len(example.input_ids) for example in examples]
    order = MicroBatchOrder(lengths, 3, seed=0, pack_to=512)
    batch = max(order.epoch(0), key=len)
    chosen = [examples[i] for i in batch]
    packed = Collator(tokenizer.pad_token_id, causal=True, pack_to=512)(chosen)
    unpacked = Collator(tokenizer.pad_token_id, causal=True)(chosen)
    assert packed["input_ids"].shape[0] <= 3 < len(chosen)  # the rows packing made, several examples each
    peft_model = load(tiny_model, tiny_data, tokenizer)
    loss, grads = loss_and_grads(peft_model, unpacked)
    packed_loss, packed_grads = loss_and_grads(peft_model, packed)
    torch.testing.assert_close(packed_loss, loss, rtol=1e-5, atol=1e-4)
    for ours, reference in zip(packed_grads, grads, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


def test_adapters_in_the_compute_dtype_give_the_fp32_adapters_loss_and_gradients(
    tiny_model, tiny_data, tokenizer, examples
):
    batch = Collator(tokenizer.pad_token_id, causal=True)(examples[:6])
    fp32 = load(tiny_model, tiny_data, tokenizer, "bf16")
    compute = load(tiny_model, tiny_data, tokenizer, "bf16", adapterPrecision="compute")
    assert {p.dtype for p in fp32.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in compute.parameters() if p.requires_grad} == {torch.bfloat16}
    loss, grads = loss_and_grads(fp32, batch, torch.bfloat16)
    compute_loss, compute_grads = loss_and_grads(compute, batch, torch.bfloat16)
    torch.testing.assert_close(compute_loss, loss, rtol=1e-2, atol=1e-2)
    for ours, reference in zip(compute_grads, grads, strict=True):
        # bf16 keeps 8 bits of mantissa: compare each gradient as a whole, relative to its size
        assert (ours - reference).norm() <= 0.05 * reference.norm() + 1e-6


def test_compute_dtype_adapters_need_bf16(tiny_model, tiny_data, tokenizer):
    from finetune_trainer.model import Precision, adapter_weights_dtype

    assert adapter_weights_dtype("compute", resolve_precision("fp32", CPU)) == torch.float32
    with pytest.raises(ConfigError, match="adapterPrecision compute needs training"):
        adapter_weights_dtype("compute", Precision("fp16", torch.float16, torch.float16))
