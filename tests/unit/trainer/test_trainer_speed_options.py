"""Issue 26's speed options give the same training: first-fit-decreasing packed micro-batches and adapters in
the compute dtype (same loss and LoRA gradients as the plain path, within the dtype's tolerance)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune_trainer.batching import Collator, MicroBatchOrder
from finetune_trainer.config import ConfigError
from finetune_trainer.data import load_training_data
from finetune_trainer.model import SupervisedLoss, load_model, resolve_precision
from tests.unit.trainer.test_trainer_model import config

CPU = torch.device("cpu")
COMPILE_CHILD = "FINETUNE_TEST_COMPILE_CHILD"
REPO = Path(__file__).resolve().parents[3]


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


def loss_and_grads(peft_model, batch, autocast_dtype=None, loss_module=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    inputs = {k: v for k, v in batch.items() if k != "counts"}
    with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = (loss_module or SupervisedLoss(peft_model, causal=True))(**inputs)
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


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["all-linear"]])
@pytest.mark.parametrize("layout", ["uniform", "padded", "packed"])
def test_last_layer_on_targets_gives_the_full_layers_loss_and_gradients(
    tiny_model, tiny_data, tokenizer, examples, targets, layout
):
    same_length = [e for e in examples if len(e.input_ids) == len(examples[0].input_ids)]
    chosen = same_length[:4] if layout == "uniform" else examples[:6]
    collate = Collator(tokenizer.pad_token_id, causal=True, pack_to=512 if layout == "packed" else None)
    batch = collate(chosen)
    assert ("attention_mask" in batch) == (layout == "padded") and ("position_ids" in batch) == (layout == "packed")
    rows = batch["input_ids"].shape[0]
    assert rows < len(chosen) if layout == "packed" else rows == len(chosen)
    peft_model = load(tiny_model, tiny_data, tokenizer, targetModules=targets)
    loss_module = SupervisedLoss(peft_model, causal=True)
    layer = loss_module.last_layer
    assert layer is not None
    computed: list[int] = []
    hook = layer.layer.mlp.register_forward_hook(lambda module, args, out: computed.append(args[0].shape[0]))
    fast_loss, fast_grads = loss_and_grads(peft_model, batch, loss_module=loss_module)
    loss_module.last_layer = None  # the layer's own forward at every position
    loss, grads = loss_and_grads(peft_model, batch, loss_module=loss_module)
    hook.remove()
    # the MLP ran on the supervised positions only, then on every position of every row
    assert computed == [batch["counts"]["supervised"], rows]
    assert batch["counts"]["supervised"] < batch["counts"]["padded"] // 2
    torch.testing.assert_close(fast_loss, loss, rtol=1e-5, atol=1e-5)
    for ours, reference in zip(fast_grads, grads, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)  # fp32: another summation order


def test_flops_count_the_last_layer_at_targets_only_where_the_batch_takes_it(tiny_model, tiny_data, tokenizer):
    from finetune_trainer.metrics import FlopsModel, flops_model
    from finetune_trainer.model import base_model

    peft_model = load(tiny_model, tiny_data, tokenizer, targetModules=["q_proj", "v_proj"])
    last = base_model(peft_model).get_decoder().layers[-1]
    q_o_mlp = [last.self_attn.q_proj, last.self_attn.o_proj, last.mlp]
    model = flops_model(peft_model, head_on_targets_only=True)
    assert model.last_layer_params == sum(p.numel() for m in q_o_mlp for p in m.parameters()) > 0
    assert flops_model(peft_model, head_on_targets_only=False).last_layer_params == 0
    flops = FlopsModel(
        body_params=1000, head_params=100, layers=2, hidden=8, head_on_targets_only=True, last_layer_params=300
    )
    # 10 tokens in 2 rows padded to 6; 4 supervised take the last layer on targets, 7 (over half of 12) do not
    assert flops.step_flops(tokens=10, supervised=4, padded=12, samples=2) == (
        4 * 700 * 10 + 4 * 300 * 4 + 4 * 100 * 4 + 6 * 1 * 8 * 6 * 10 + 12 * 8 * 6 * 4
    )
    assert flops.step_flops(tokens=10, supervised=7, padded=12, samples=2) == (
        4 * 1000 * 10 + 4 * 100 * 7 + 6 * 2 * 8 * 6 * 10
    )


def test_last_layer_on_targets_takes_a_micro_batch_without_targets(tiny_model, tiny_data, tokenizer, examples):
    batch = Collator(tokenizer.pad_token_id, causal=True)(examples[:3])
    batch.update(supervised_index=batch["supervised_index"][:0], targets=batch["targets"][:0])  # all truncated away
    peft_model = load(tiny_model, tiny_data, tokenizer, targetModules=["q_proj", "v_proj"])
    loss, grads = loss_and_grads(peft_model, batch)
    assert loss == 0 and all(not grad.any() for grad in grads)


def test_compiled_decoder_layers_give_the_eager_loss_and_gradients():
    """training.compile: each decoder layer compiled in place (the last one on targets only, as it runs).

    In a fresh interpreter, as the trainer compiles in its own process: inductor's C++ build imports
    setuptools, whose distutils shim refused to load in the whole suite's process (CI: "assert '_distutils' in
    core.__file__", the standard library's distutils already imported), and the layers then ran eagerly."""
    if os.environ.get(COMPILE_CHILD) != "1":
        test = f"{Path(__file__).relative_to(REPO)}::test_compiled_layers_in_a_fresh_interpreter"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test]
        env = {**os.environ, COMPILE_CHILD: "1"}
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
        assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout[-4000:]


@pytest.mark.skipif(os.environ.get(COMPILE_CHILD) != "1", reason="run alone by the test above")
def test_compiled_layers_in_a_fresh_interpreter(tiny_model, tiny_data, tokenizer, examples):
    from torch._dynamo.utils import counters

    from finetune_trainer.model import base_model, compile_decoder_layers

    batch = Collator(tokenizer.pad_token_id, causal=True)(examples[:4])
    eager = load(tiny_model, tiny_data, tokenizer, targetModules=["q_proj", "v_proj"])
    compiled = load(tiny_model, tiny_data, tokenizer, targetModules=["q_proj", "v_proj"])
    graphs = counters["stats"]["unique_graphs"]
    assert compile_decoder_layers(compiled, CPU) == base_model(compiled).config.num_hidden_layers
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # adapters and checkpoints unchanged
    loss, grads = loss_and_grads(eager, batch)
    compiled_loss, compiled_grads = loss_and_grads(compiled, batch)
    assert counters["stats"]["unique_graphs"] > graphs  # compiled, not run eagerly after a failed compile
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-5)
    for ours, reference in zip(compiled_grads, grads, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


def test_without_a_compiler_the_layers_run_uncompiled_with_a_warning(
    tiny_model, tiny_data, tokenizer, monkeypatch, caplog
):
    from finetune_trainer.model import compile_decoder_layers

    monkeypatch.setenv("CXX", "/nonexistent/c++")
    peft_model = load(tiny_model, tiny_data, tokenizer, targetModules=["q_proj", "v_proj"])
    assert compile_decoder_layers(peft_model, CPU) == 0
    assert "no compiler (/nonexistent/c++) for inductor's kernels" in caplog.text
