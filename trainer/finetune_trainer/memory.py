"""GPU memory: the largest micro-batch (in tokens) a GPU can train without running out, from the model's shape.

Activations dominate LoRA training memory: the frozen weights need no gradients or optimizer state, but
every decoder layer keeps what its backward needs, about SAVED_BYTES_PER_TOKEN_LAYER_HIDDEN bytes per
token per hidden unit (bf16 activations, fp32 adapters with dropout on all seven projections: the worst
case, measured by tests/unit/trainer/test_trainer_memory.py with saved-tensor hooks). With gradient
checkpointing a recomputed layer keeps only its bf16 input, and one layer's activations live during its
recomputation. The LM head's fp32 logits (vocabulary-sized, for each supervised token) come on top.

The derived budget caps micro-batches (batchSize examples, cut earlier when they would exceed it); an
explicit training.maxTokensPerBatch wins. This module is pure: the GPU's memory is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import ConfigError

GIB = 2**30
# Bytes a decoder layer saves for its backward per token and per hidden unit (measured on a Llama with
# LoRA r=16 on all seven projections, fp32 adapters, dropout 0.05, bf16 autocast; see the module docstring),
# rounded up so that the budget stays under what a GPU really holds.
SAVED_BYTES_PER_TOKEN_LAYER_HIDDEN = 72
# The LM head per supervised token: bf16 logits, their fp32 copy and the fp32 gradient of the softmax.
LOGIT_BYTES_PER_TOKEN_VOCAB = 10
CHECKPOINTED_LAYER_INPUT_BYTES = 2  # a recomputed layer keeps its bf16 input (per token, per hidden unit)
# Kept free: the CUDA context, cuBLAS/NCCL workspaces and the caching allocator's fragmentation.
RESERVED_BYTES = 3 * GIB
USABLE_FRACTION = 0.92
BUDGET_MULTIPLE = 256  # budgets are rounded down to this many tokens


@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate needs of a decoder model's config."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool = False

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """From a transformers config (a Llama-like decoder's field names)."""
        hidden = config.hidden_size
        heads = config.num_attention_heads
        return cls(
            layers=config.num_hidden_layers,
            hidden=hidden,
            intermediate=getattr(config, "intermediate_size", None) or 4 * hidden,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            vocab=config.vocab_size,
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )

    @property
    def parameters(self) -> int:
        """Parameters of a Llama-like decoder: attention with grouped KV heads, a gated MLP, norms, embeddings."""
        head_dim = self.hidden // self.heads
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        per_layer = attention + 3 * self.hidden * self.intermediate + 2 * self.hidden
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * per_layer + embeddings + self.hidden


def activation_bytes_per_token(shape: ModelShape, checkpointing: bool, every_n_layers: int = 1) -> int:
    """Peak bytes of saved activations per token of a micro-batch (every token supervised: the worst case)."""
    layer = SAVED_BYTES_PER_TOKEN_LAYER_HIDDEN * shape.hidden
    if checkpointing:
        recomputed = -(-shape.layers // every_n_layers)  # layers 0, n, 2n, ... are recomputed
        kept = shape.layers - recomputed
        layers = kept * layer + recomputed * CHECKPOINTED_LAYER_INPUT_BYTES * shape.hidden + layer
    else:
        layers = shape.layers * layer
    return layers + LOGIT_BYTES_PER_TOKEN_VOCAB * shape.vocab


def token_budget(
    gpu_bytes: int, shape: ModelShape, weight_bytes_per_param: int, checkpointing: bool, every_n_layers: int = 1
) -> int:
    """Tokens (padding included) one micro-batch may hold on a GPU of gpu_bytes; 0 when even the weights
    do not fit."""
    weights = shape.parameters * weight_bytes_per_param
    free = gpu_bytes * USABLE_FRACTION - RESERVED_BYTES - weights
    tokens = int(free // activation_bytes_per_token(shape, checkpointing, every_n_layers))
    return max(0, tokens // BUDGET_MULTIPLE * BUDGET_MULTIPLE)


def choose_token_cap(budget: int | None, saved_cap: int | None, max_seq_length: int) -> int | None:
    """The cap micro-batches are cut by: this GPU's budget (None: no GPU, no cap), or on a resume the cap the
    checkpoint was trained with where it still fits (the micro-batches, and so the data position, depend on
    it). A budget below maxSeqLength raises ConfigError (exit 2): the longest example could never run."""
    if budget is None:
        return saved_cap
    if budget < max_seq_length:
        raise ConfigError(
            f"training.maxSeqLength {max_seq_length}: {knobs_message(max_seq_length)} (the memory budget of this "
            f"GPU for this model is {budget} tokens)"
        )
    return saved_cap if saved_cap is not None and saved_cap <= budget else budget


def knobs_message(tokens: int | None) -> str:
    """What to change when a micro-batch does not fit: said by the budget check and by an out-of-memory exit."""
    held = f"a micro-batch of {tokens} tokens" if tokens is not None else "a micro-batch"
    return (
        f"{held} does not fit in GPU memory: lower training.maxTokensPerBatch (or batchSize or maxSeqLength), "
        "turn on training.gradientCheckpointing, or lower training.gradientCheckpointingEveryNLayers"
    )
