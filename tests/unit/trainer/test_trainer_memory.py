"""The GPU memory budget of a micro-batch, against activation memory measured on a real (small) Llama."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from finetune_trainer import memory
from finetune_trainer.config import ConfigError
from finetune_trainer.memory import GIB, ModelShape, token_budget
from finetune_trainer.model import SupervisedLoss

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# config.json of meta-llama/Llama-3.1-8B
LLAMA_8B = ModelShape(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256)
H100 = 80 * GIB


def saved_bytes_per_token(hidden: int, vocab: int, seq: int = 128) -> tuple[float, float]:
    """(bytes a decoder layer saves for backward per token per hidden unit, bytes outside the layers per token
    per vocabulary entry), measured with saved-tensor hooks on a one-layer Llama of the 8B's proportions
    (head_dim 128, MLP 3.5 x hidden) in bf16 with fp32 LoRA r=16 adapters on all seven projections, dropout
    0.05, bf16 autocast, as the trainer runs it. Per token: the slope between two batch sizes, so constants
    (autocast's copies of the adapter weights) drop out. Attention weights (seq x seq) are left out: CPU SDPA
    keeps them, the GPU's flash and memory-efficient kernels do not."""
    from peft import LoraConfig, get_peft_model

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 7 // 2,
        num_hidden_layers=1,
        num_attention_heads=hidden // 128,
        num_key_value_heads=1,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(torch.bfloat16)
    peft_model = get_peft_model(
        base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=ALL_PROJECTIONS)
    )
    for param in peft_model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    peft_model.train()
    loss_module = SupervisedLoss(peft_model, causal=True)
    layer = base.model.layers[0]
    weights = {p.untyped_storage().data_ptr() for p in peft_model.parameters()}

    def measure(rows: int) -> tuple[int, int]:
        seen: dict[int, tuple[bool, int]] = {}
        inside = [False]

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            quadratic = tensor.dim() >= 2 and tensor.shape[-2:] == (seq, seq)
            if storage.data_ptr() not in weights and not quadratic:
                seen.setdefault(storage.data_ptr(), (inside[0], storage.nbytes()))
            return tensor

        hooks = [
            layer.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True)),
            layer.register_forward_hook(lambda *_: inside.__setitem__(0, False)),
        ]
        ids = torch.randint(0, vocab, (rows, seq))
        try:
            autocast = torch.autocast("cpu", dtype=torch.bfloat16)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
                loss = loss_module(input_ids=ids, targets=ids.flatten(), supervised_index=torch.arange(ids.numel()))
            loss.backward()
        finally:
            for hook in hooks:
                hook.remove()
        in_layer = sum(size for is_layer, size in seen.values() if is_layer)
        return in_layer, sum(size for is_layer, size in seen.values() if not is_layer)

    (layer_small, outside_small), (layer_large, outside_large) = measure(2), measure(4)
    tokens = 2 * seq
    return (layer_large - layer_small) / tokens / hidden, (outside_large - outside_small) / tokens / vocab


def test_the_8b_budget_on_an_80_gib_gpu_holds_the_measured_activations_with_and_without_checkpointing():
    per_layer_hidden, per_vocab = saved_bytes_per_token(hidden=256, vocab=512)
    assert 30 < per_layer_hidden <= memory.SAVED_BYTES_PER_TOKEN_LAYER_HIDDEN
    assert per_vocab <= memory.LOGIT_BYTES_PER_TOKEN_VOCAB
    shape = LLAMA_8B
    weights = shape.parameters * 2  # bf16
    assert 8.0e9 < shape.parameters < 8.1e9  # the published 8.03B
    logits = per_vocab * shape.vocab
    measured = {
        False: per_layer_hidden * shape.hidden * shape.layers + logits,
        # a recomputed layer keeps its bf16 input; one layer's activations live while it is recomputed
        True: 2 * shape.hidden * shape.layers + per_layer_hidden * shape.hidden + logits,
    }
    budgets = {checkpointing: token_budget(H100, shape, 2, checkpointing) for checkpointing in (False, True)}
    for checkpointing, budget in budgets.items():
        assert budget * measured[checkpointing] + weights + memory.RESERVED_BYTES <= H100, checkpointing
    # The old defaults (batchSize 8 x 2048 tokens) do not fit without checkpointing; one 2048-token row does.
    assert 2048 <= budgets[False] < 8 * 2048 <= budgets[True]


def test_recomputing_fewer_layers_lowers_the_budget_and_a_small_gpu_holds_nothing():
    every = [token_budget(H100, LLAMA_8B, 2, True, every_n) for every_n in (1, 2, 4)]
    assert every[0] > every[1] > every[2] > token_budget(H100, LLAMA_8B, 2, False)
    assert token_budget(16 * GIB, LLAMA_8B, 2, True) == 0
    assert all(budget % memory.BUDGET_MULTIPLE == 0 for budget in every)


def test_shape_from_a_transformers_config():
    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
    )
    assert ModelShape.from_config(config) == LLAMA_8B


@pytest.mark.parametrize(
    ("budget", "saved", "expected"),
    [
        (None, None, None),  # no GPU: no cap
        (None, 4096, 4096),  # a GPU checkpoint resumed on CPU keeps its micro-batches
        (5376, None, 5376),
        (5376, 4096, 4096),  # a resume keeps the checkpoint's cap where it fits
        (5376, 8192, 5376),  # a smaller GPU: its own budget (with a warning by the loop)
    ],
)
def test_the_cap_is_this_gpus_budget_or_a_resumed_checkpoints(budget, saved, expected):
    assert memory.choose_token_cap(budget, saved, 2048) == expected


def test_a_budget_below_the_longest_example_is_a_permanent_error_naming_the_knobs():
    with pytest.raises(ConfigError, match=r"training\.maxSeqLength 4096") as error:
        memory.choose_token_cap(2048, None, 4096)
    message = str(error.value)
    assert "gradientCheckpointing" in message and "budget of this GPU for this model is 2048" in message
