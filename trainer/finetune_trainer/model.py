"""The model: base weights from a hub id or a path, LoRA adapters on top, precision, and the loss module.

Precision auto means bf16 where the GPU has it, else fp16 with a GradScaler, and fp32 on CPU. The frozen
base weights are loaded in that dtype on GPU; the adapter weights stay fp32 and autocast does the rest.

`SupervisedLoss` is what DDP wraps: it returns the *sum* of the per-token (or per-example) losses, which
the loop divides by the number of supervised tokens over all micro-batches and ranks of a step. For
architectures whose logits are plain `lm_head(hidden)`, the head runs only where there is a target, so
prompt and padding positions never materialise vocabulary-sized logits; for those of the plain Llama layer
form the last decoder layer, too, computes its queries, o_proj and MLP only there (`LastLayerOnTargets`).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import ALL_LINEAR, ConfigError, TrainerConfig
from .files import unreadable

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

# Causal LMs whose logits are exactly lm_head(decoder(...).last_hidden_state): no soft-capping or scaling.
HEAD_ON_TARGETS_ONLY = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "olmo", "olmo2", "smollm3"})
# Of those, the ones whose decoder layer is the plain Llama form (input norm, attention with q/k/v/o, RoPE and
# GQA, residual, post-attention norm, MLP, residual), which LastLayerOnTargets recomputes by hand.
LAST_LAYER_ON_TARGETS = frozenset({"llama", "mistral", "qwen2"})


@dataclass(frozen=True)
class Precision:
    name: str  # bf16 | fp16 | fp32
    autocast_dtype: torch.dtype | None
    weights_dtype: torch.dtype  # of the frozen base weights

    @property
    def needs_grad_scaler(self) -> bool:
        return self.name == "fp16"


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """Turn training.precision into dtypes for this device; refuse combinations that cannot run."""
    on_gpu = device.type == "cuda"
    bf16_ok = on_gpu and torch.cuda.is_bf16_supported()
    if requested == "auto":
        requested = "fp32" if not on_gpu else "bf16" if bf16_ok else "fp16"
    if requested == "fp32":
        return Precision("fp32", None, torch.float32)
    if requested == "fp16":
        if not on_gpu:
            raise ConfigError("training.precision: fp16 needs a CUDA GPU; use fp32 (or bf16) on CPU")
        return Precision("fp16", torch.float16, torch.float16)
    if requested == "bf16":
        if on_gpu and not bf16_ok:
            raise ConfigError(
                f"training.precision: bf16 is not supported by {torch.cuda.get_device_name(device)}; use fp16"
            )
        # On CPU keep fp32 weights: bf16 autocast still speeds up the matmuls where the CPU supports it.
        return Precision("bf16", torch.bfloat16, torch.bfloat16 if on_gpu else torch.float32)
    raise ConfigError(f"training.precision: unknown value {requested!r}")


def resolve_attn_implementation(requested: str, device: torch.device, precision: Precision) -> str:
    """training.attnImplementation for this process: auto is flash_attention_2 where it can run, else sdpa."""
    flash_ok = device.type == "cuda" and precision.name in ("bf16", "fp16") and _flash_attn_installed()
    if requested == "auto":
        return "flash_attention_2" if flash_ok else "sdpa"
    if requested == "flash_attention_2" and not flash_ok:
        raise ConfigError(
            "training.attnImplementation: flash_attention_2 needs the flash-attn package, a CUDA GPU and bf16 or "
            "fp16 precision; use auto (the fastest available) or sdpa"
        )
    return requested


def _flash_attn_installed() -> bool:
    from transformers.utils import is_flash_attn_2_available

    return is_flash_attn_2_available()


def _is_local_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).exists()


def unreadable_model_path(name: str) -> str | None:
    """Why this process cannot read the model at a local path (None if it can, or if name is a hub id).

    A local model must be readable in every worker: the trainer does not send base weights between pods
    (tens of GB over the training network at every start); mount the volume in every worker, or use a hub
    id with a model cache."""
    if not _is_local_path(name):
        return None
    path = Path(name).expanduser()
    denied = unreadable(path)
    if denied:
        return f"spec.model: {denied}; the workers' uid must be able to read the whole model folder"
    if path.is_dir() and os.access(path, os.R_OK | os.X_OK):
        return None
    return (
        f"spec.model: path {name} is not readable here; a model on a volume must be mounted in every worker "
        "(a ReadWriteOnce claim that only worker-0 mounts cannot hold it): mount it in all workers, or use a "
        "hub id with a model cache"
    )


# Weights in other formats than transformers loads here: a hub repo often holds several copies.
HUB_IGNORE_PATTERNS = ["*.gguf", "*.onnx", "*.onnx_data", "*.h5", "*.msgpack", "*.tflite", "*.ot", "original/*"]


def fetch_model(name: str) -> str:
    """A hub id's snapshot in the local cache ($HF_HOME), downloaded by one process of the pod at a time:
    the first downloads while the others wait on a file lock under the cache, then find it cached. Returns
    the local directory (a path is returned as is). A hub answer that retrying cannot change (not found,
    gated, 401/403) raises ConfigError naming spec.model and HF_TOKEN; network trouble stays retryable.
    """
    if _is_local_path(name):
        return name
    from filelock import FileLock
    from huggingface_hub import constants, snapshot_download

    lock = Path(constants.HF_HUB_CACHE) / ".locks" / f"finetune-{name.replace('/', '--')}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(lock)):
            return snapshot_download(name, ignore_patterns=HUB_IGNORE_PATTERNS)
    except Exception as e:
        refusal = _hub_refusal(e)
        if refusal is None:
            raise
        raise ConfigError(
            f"spec.model: the hub refused {name!r} ({refusal}): check the id, and for a private or gated model "
            "put a token with access (its terms accepted on the hub) in HF_TOKEN (spec.template env from a Secret)"
        ) from e


def _hub_refusal(error: BaseException | None) -> str | None:
    """What a permanent hub answer says (not found, gated, unauthorised), from the error types of
    huggingface_hub (and the error it wraps); None for anything a retry may cure."""
    from huggingface_hub.errors import (
        DisabledRepoError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    while error is not None:
        if isinstance(error, HFValidationError):
            return "not a valid model id"
        if isinstance(error, GatedRepoError):
            return "gated model, no access with this token"
        if isinstance(error, RepositoryNotFoundError):
            return "not found, or private without a valid token"
        if isinstance(error, (RevisionNotFoundError, DisabledRepoError)):
            return type(error).__name__
        if isinstance(error, HfHubHTTPError) and error.response is not None:
            status = error.response.status_code
            if status in (401, 403, 404):
                return f"HTTP {status}"
        error = error.__cause__
    return None


def _from_pretrained(loader: Any, name: str, **kwargs: Any) -> Any:
    """from_pretrained, turning 'this model does not exist' into a ConfigError naming the model field."""
    if _is_local_path(name) and not Path(name).expanduser().exists():
        raise ConfigError(f"model: path {name} does not exist")
    try:
        return loader.from_pretrained(name, **kwargs)
    except OSError as e:
        if _is_local_path(name) or _hub_refusal(e) is not None:
            raise ConfigError(f"model: cannot load {name!r}: {e}") from e
        raise  # network trouble and the like: retryable


def load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, name)
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of attention and loss, so any token will do.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    return tokenizer


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, Any]:
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def load_model(
    config: TrainerConfig,
    tokenizer: Any,
    precision: Precision,
    device: torch.device,
    label_names: list[str] | None,
    attn_implementation: str = "sdpa",
    source: str | None = None,
) -> PeftModel:
    """The base model with LoRA adapters applied (a PeftModel), on `device`, only the adapters trainable,
    in training mode (from_pretrained leaves a model in eval mode, where dropout is off and transformers
    never recomputes activations). source: where to read it (fetch_model's snapshot), else config.model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    # Each process reads the frozen base straight onto its own device: safetensors are memory-mapped, so on
    # CPU the processes of a node share one copy of the page cache and on GPU no CPU copy is built.
    kwargs = {
        **_dtype_kwarg(precision.weights_dtype),
        "attn_implementation": attn_implementation,
        "low_cpu_mem_usage": True,  # transformers 4.x; 5.x always loads this way
        **({"device_map": {"": device}} if device.type == "cuda" else {}),
    }
    model: PreTrainedModel
    if config.task == "sequence-classification":
        if label_names is None:
            raise ValueError("load_model: a sequence-classification task needs the data set's label_names")
        model = _from_pretrained(
            AutoModelForSequenceClassification,
            source or config.model,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)},
            ignore_mismatched_sizes=True,
            **kwargs,
        )
        model.config.pad_token_id = tokenizer.pad_token_id
        task_type = "SEQ_CLS"
    else:
        model = _from_pretrained(AutoModelForCausalLM, source or config.model, **kwargs)
        task_type = "CAUSAL_LM"
    model.name_or_path = model.config._name_or_path = config.model  # the adapter names the model, not a cache dir
    model.config.use_cache = False
    if config.training.gradient_checkpointing:
        enable_gradient_checkpointing(model, config.training.gradient_checkpointing_every_n_layers)
    lora = config.lora
    target_modules = lora_targets(lora.target_modules, model)
    try:
        peft_model = get_peft_model(
            model,
            LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft annotates int; it scales by any float
                lora_dropout=lora.dropout,
                target_modules=target_modules,
                bias="none",
                task_type=task_type,
            ),
        )
    except ValueError as e:
        if "not found in the base model" in str(e) or "target_modules" in str(e):
            raise ConfigError(f"lora.targetModules {target_modules}: {e}") from e
        raise
    adapter_dtype = adapter_weights_dtype(lora.adapter_precision, precision)
    for param in peft_model.parameters():
        if param.requires_grad:
            # Adapters (and a classifier head copied from half-precision weights) train in fp32 by default:
            # AdamW on bf16 weights loses small updates, and GradScaler refuses fp16 gradients.
            param.data = param.data.to(adapter_dtype)
    peft_model.to(device)
    peft_model.train()
    trainable, total = count_parameters(peft_model)
    log.info(
        "LoRA on %s: %d trainable parameters of %d (%.3f%%)", target_modules, trainable, total, 100 * trainable / total
    )
    return peft_model


def adapter_weights_dtype(adapter_precision: str, precision: Precision) -> torch.dtype:
    """lora.adapterPrecision for this run: fp32, or the autocast dtype (bf16 only: fp16 needs loss scaling,
    which refuses fp16 gradients)."""
    if adapter_precision == "fp32" or precision.autocast_dtype is None:
        return torch.float32
    if precision.autocast_dtype != torch.bfloat16:
        raise ConfigError(
            f"lora.adapterPrecision compute needs training.precision bf16, not {precision.name} (fp16 adapters "
            "cannot be loss-scaled); use adapterPrecision fp32"
        )
    return torch.bfloat16


def enable_gradient_checkpointing(model: PreTrainedModel, every_n_layers: int = 1) -> None:
    """Recompute every n-th decoder layer in the backward pass (non-reentrant: no input grads needed)."""
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x: every_n_layers built in
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options, every_n_layers=every_n_layers)
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    if every_n_layers > 1:
        layers = [m for m in model.modules() if hasattr(m, "gradient_checkpointing") and m is not model]
        layers = [m for m in layers if type(m).__name__.endswith("DecoderLayer")]
        for index, layer in enumerate(layers):
            # torch types assigning a Module attribute as Tensor | Module; transformers' layers keep a bool here
            layer.gradient_checkpointing = index % every_n_layers == 0  # type: ignore[assignment]


def compile_decoder_layers(model: nn.Module, device: torch.device) -> int:
    """training.compile: torch.compile each decoder layer in place (its state_dict keys, so the adapter's and
    the checkpoints', do not change); the number compiled. One compiled graph serves every layer (parameters
    are its inputs). Where the compiler cannot run, nothing is compiled; a layer dynamo cannot trace, or a
    shape past its recompile limit, runs eagerly (suppress_errors), so training never fails for it."""
    unavailable = compiler_unavailable(device)
    if unavailable:
        log.warning("training.compile: %s; the decoder layers run uncompiled", unavailable)
        return 0
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    layer_types = set(getattr(model, "_no_split_modules", None) or [])  # transformers' name for its layer class
    layers = [module for module in model.modules() if type(module).__name__ in layer_types]
    for layer in layers:
        layer.compile()
    log.info("training.compile: %d decoder layers compiled (the first steps of each shape compile them)", len(layers))
    return len(layers)


def compiler_unavailable(device: torch.device) -> str | None:
    """Why torch.compile cannot run here (None if it can): inductor needs triton and a C compiler (for triton's
    launchers) on a GPU, a C++ compiler on CPU."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "triton is not installed (torch's CUDA wheels bring it)"
        variable, compilers = "CC", ["cc", "gcc"]
    else:
        variable, compilers = "CXX", ["c++", "g++"]
    compilers = [os.environ[variable]] if os.environ.get(variable) else compilers
    if not any(shutil.which(compiler) for compiler in compilers):
        return f"no compiler ({' or '.join(compilers)}) for inductor's kernels"
    return None


def lora_targets(target_modules: list[str] | None, model: PreTrainedModel) -> list[str] | str:
    """What peft gets as target_modules: the names given, "all-linear" for [all-linear], else the default."""
    if target_modules == [ALL_LINEAR]:
        return ALL_LINEAR
    return target_modules or default_target_modules(model)


def default_target_modules(model: PreTrainedModel) -> list[str] | str:
    """peft's attention projections for the architecture (q_proj, v_proj for Llama), else every linear layer."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    return list(DEFAULTS.get(model.config.model_type, [])) or ALL_LINEAR


def base_model(peft_model: PeftModel) -> PreTrainedModel:
    """The transformers model under the adapters (peft types get_base_model() as a plain nn.Module)."""
    from transformers import PreTrainedModel

    base = peft_model.get_base_model()
    if not isinstance(base, PreTrainedModel):
        raise TypeError(f"the PEFT model wraps a {type(base).__name__}, not a transformers PreTrainedModel")
    return base


def count_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def last_decoder_layer(base: PreTrainedModel) -> Any:
    """The decoder's last layer where LastLayerOnTargets can compute it (the plain Llama form, full attention:
    no sliding window), else None. (Any: transformers' layers and their submodules are typed as nn.Module.)"""
    if base.config.model_type not in LAST_LAYER_ON_TARGETS:
        return None
    layer = base.get_decoder().layers[base.config.num_hidden_layers - 1]
    window = getattr(layer.self_attn, "sliding_window", getattr(base.config, "sliding_window", None))
    return layer if window is None else None


class LastLayerOnTargets:
    """The decoder's last layer computed only at the supervised positions, while `on_targets` is in effect.

    Its output reaches the loss only through the final norm and the LM head at the supervised positions, so
    its queries, attention, o_proj, post-attention norm and MLP are needed only there; its keys and values
    are needed at every position. It is installed as the layer's own `forward` (not a wrapper module, which
    would rename the adapter's state_dict keys); at other times the layer runs its class's forward. The other
    positions of its output keep the layer's input, which nothing downstream reads but the final norm.
    """

    def __init__(self, layer: Any):
        self.layer = layer
        self.targets: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None = None
        layer.forward = self.forward

    @classmethod
    def install(cls, layer: Any) -> LastLayerOnTargets:
        """The layer's LastLayerOnTargets, made once per layer (several loss modules may share a model)."""
        existing = getattr(layer.__dict__.get("forward"), "__self__", None)
        return existing if isinstance(existing, cls) else cls(layer)

    @contextmanager
    def on_targets(
        self,
        index: torch.Tensor | None,
        positions: int,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
    ) -> Iterator[None]:
        """Within this block the layer runs at `index` (the flattened supervised positions, sorted) of a batch
        of `positions`, where that pays: at most half the positions have a target (above that, the gathering
        and the explicit attention mask cost about what the skipped positions save)."""
        if index is not None and on_targets_pays(len(index), positions):
            self.targets = (index, attention_mask, position_ids)
        try:
            yield
        finally:
            self.targets = None

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        layer = self.layer
        if self.targets is None:
            return type(layer).forward(layer, hidden_states, *args, **kwargs)
        compute = partial(_layer_on_targets, layer, kwargs["position_embeddings"], *self.targets)
        if layer.gradient_checkpointing and layer.training and torch.is_grad_enabled():
            # the index is bound into the function, so the recomputation in the backward pass sees it too
            return layer._gradient_checkpointing_func(compute, hidden_states)
        return compute(hidden_states)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as transformers' Llama applies it (rotate_half)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


def _layer_on_targets(
    layer: Any,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    index: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    hidden: torch.Tensor,
) -> torch.Tensor:
    """A Llama-form decoder layer's output at the flattened positions `index` (sorted), scattered into its input.

    The queries are laid out per row, padded to the row with the most targets: query slot s of row b is the
    row's s-th target. A query sees the keys at or before its position, within its example (packed rows
    restart their position ids at each example), that are not padding. The widest row's count is read off the
    device: on a GPU, one small sync per micro-batch."""
    batch, length, _ = hidden.shape
    attn = layer.self_attn
    rows, columns = index // length, index % length
    per_row = torch.bincount(rows, minlength=batch)
    slots = torch.arange(len(index), device=index.device) - (per_row.cumsum(0) - per_row)[rows]
    width = int(per_row.max())

    cos, sin = position_embeddings
    x = layer.input_layernorm(hidden)
    keys = attn.k_proj(x).view(batch, length, -1, attn.head_dim).transpose(1, 2)
    keys = _rotate(keys, cos.unsqueeze(1), sin.unsqueeze(1))
    values = attn.v_proj(x).view(batch, length, -1, attn.head_dim).transpose(1, 2)
    query = attn.q_proj(x.flatten(0, 1).index_select(0, index)).unflatten(-1, (-1, attn.head_dim))
    cos, sin = (t.expand(batch, -1, -1)[rows, columns].unsqueeze(1) for t in position_embeddings)
    query = _rotate(query, cos, sin)
    queries = query.new_zeros(batch, width, *query.shape[1:]).index_put((rows, slots), query)

    # Unused slots sit at position 0 and see key 0 (never all keys masked: no NaN); their output is dropped.
    position = torch.zeros(batch, width, dtype=torch.long, device=index.device).index_put((rows, slots), columns)
    key_position = torch.arange(length, device=index.device)
    visible = key_position <= position.unsqueeze(-1)
    if position_ids is not None:
        start = torch.zeros_like(position).index_put((rows, slots), columns - position_ids[rows, columns])
        visible &= key_position >= start.unsqueeze(-1)
    if attention_mask is not None:
        visible &= attention_mask.bool().unsqueeze(1)
    attended = F.scaled_dot_product_attention(
        queries.transpose(1, 2),
        keys,
        values,
        attn_mask=visible.unsqueeze(1),
        dropout_p=attn.attention_dropout if layer.training else 0.0,
        scale=attn.scaling,
        enable_gqa=True,
    )
    attended = attended.transpose(1, 2)[rows, slots].flatten(1)
    out = hidden.flatten(0, 1).index_select(0, index) + attn.o_proj(attended)
    out = out + layer.mlp(layer.post_attention_layernorm(out))
    return hidden.flatten(0, 1).index_copy(0, index, out).view_as(hidden)


def on_targets_pays(supervised: int, positions: int) -> bool:
    """Whether a micro-batch takes LastLayerOnTargets (the FLOPs model counts the same)."""
    return 2 * supervised <= positions


class SupervisedLoss(nn.Module):
    """Wraps the PeftModel; forward returns the summed cross-entropy over the batch's targets."""

    def __init__(self, peft_model: PeftModel, causal: bool):
        super().__init__()
        self.peft_model = peft_model
        self.causal = causal
        base = base_model(peft_model)
        self.head_on_targets_only = causal and base.config.model_type in HEAD_ON_TARGETS_ONLY
        self.last_layer: LastLayerOnTargets | None = None
        if self.head_on_targets_only:
            self._decoder = base.get_decoder()
            self._head = base.get_output_embeddings()
            layer = last_decoder_layer(base)
            if layer is not None:
                self.last_layer = LastLayerOnTargets.install(layer)

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        supervised_index: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **flash_attention_kwargs: Any,  # packed examples' boundaries, for flash attention's varlen kernel
    ) -> torch.Tensor:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        inputs.update(flash_attention_kwargs)
        if not self.causal:
            logits = self.peft_model(**inputs).logits
            return F.cross_entropy(logits.float(), targets, reduction="sum")
        if self.head_on_targets_only:
            # flash attention's one-row packing keeps the full layer: a dense mask over that row costs more
            with (
                self.last_layer.on_targets(supervised_index, input_ids.numel(), attention_mask, position_ids)
                if self.last_layer is not None and not flash_attention_kwargs
                else nullcontext()
            ):
                hidden = self._decoder(**inputs, use_cache=False)[0]
            logits = self._head(hidden.flatten(0, 1).index_select(0, supervised_index))
        else:
            logits = self.peft_model(**inputs).logits
            logits = logits.flatten(0, 1).index_select(0, supervised_index)
        return F.cross_entropy(logits.float(), targets, reduction="sum")


def make_optimizer(model: nn.Module, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (no decay on biases and norms), fused where torch has it."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [group for group in groups if group["params"]]
    try:
        return torch.optim.AdamW(groups, lr=learning_rate, fused=True)
    except (RuntimeError, TypeError) as e:  # fused AdamW needs CUDA, or torch >= 2.4 on CPU
        log.info("fused AdamW unavailable (%s): using the foreach implementation", e)
        return torch.optim.AdamW(groups, lr=learning_rate, foreach=True)


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup_steps: int, total_steps: int):
    """Linear warmup, then constant, linear or cosine decay to zero at total_steps."""
    import math

    # A closure, not a callable object: LambdaLR would save an object's attributes with its state and
    # restore a stale total_steps after a resume with another world size.
    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if kind == "linear":
            return 1.0 - progress
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
