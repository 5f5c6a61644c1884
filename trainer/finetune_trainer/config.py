"""The trainer's configuration: the training part of a FineTuneJob spec.

These models are the one source of truth for those fields. The operator's FineTuneJob spec embeds them,
the CRD schema is generated from them, and the trainer reads the same models back from the ConfigMap the
operator mounts. This module imports no torch so the operator image stays slim.
"""

from __future__ import annotations

import hashlib
import json
from enum import Enum
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel


class SpecModel(BaseModel):
    """Base of every spec model: snake_case in Python, camelCase in YAML, unknown keys refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
        validate_default=True,
    )


class Task(str, Enum):
    causal_lm = "causal-lm"
    sequence_classification = "sequence-classification"


class DatasetFormat(str, Enum):
    alpaca = "alpaca"
    chat = "chat"
    text = "text"
    classification = "classification"


class Precision(str, Enum):
    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class AttnImplementation(str, Enum):
    auto = "auto"
    flash_attention_2 = "flash_attention_2"
    sdpa = "sdpa"
    eager = "eager"


class AdapterPrecision(str, Enum):
    fp32 = "fp32"
    compute = "compute"


class LrScheduler(str, Enum):
    constant = "constant"
    linear = "linear"
    cosine = "cosine"


class DatasetSpec(SpecModel):
    path: str = Field(
        min_length=1,
        description="Path to the training data (JSONL, or CSV for classification) as the workers see it.",
    )
    format: DatasetFormat = Field(
        default=DatasetFormat.alpaca,
        description="alpaca (instruction/input/output), chat (messages), text (text), classification (text/label).",
    )
    eval_path: str | None = Field(
        default=None,
        min_length=1,
        description="Held-out data in the same format as path, evaluated every training.evalEverySteps and at the end.",
    )
    eval_fraction: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="Without evalPath: hold out this fraction of path (chosen by training.seed) for evaluation.",
    )

    @model_validator(mode="after")
    def _one_eval_set(self) -> DatasetSpec:
        if self.eval_path is not None and self.eval_fraction > 0:
            raise ValueError("give dataset.evalPath or dataset.evalFraction, not both")
        return self


ALL_LINEAR = "all-linear"  # lora.targetModules: [all-linear], peft's name for every linear layer but the head


class LoraSpec(SpecModel):
    r: int = Field(default=16, ge=1, description="LoRA rank.")
    alpha: float = Field(default=32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | None = Field(
        default=None,
        description="Module names to adapt, or [all-linear] for every linear layer but the output head (QLoRA's "
        "practice, peft's all-linear); default: peft's choice for the architecture (q_proj and v_proj for Llama, "
        "Mistral and Qwen, as in the LoRA paper), else all-linear.",
    )

    adapter_precision: AdapterPrecision = Field(
        default=AdapterPrecision.fp32,
        description="fp32: adapter weights, gradients and AdamW state in fp32 (peft casts each bf16 input to fp32 "
        "for them). compute: in the bf16 compute dtype, which saves those fp32 input copies (activation memory, "
        "most with dropout 0) and the casts, at the cost of bf16 weight updates (8-bit mantissa: small updates "
        "to large weights round away). Needs precision bf16.",
    )

    @model_validator(mode="after")
    def _all_linear_alone(self) -> LoraSpec:
        if self.target_modules is not None and ALL_LINEAR in self.target_modules and len(self.target_modules) > 1:
            raise ValueError(f"lora.targetModules: {ALL_LINEAR} already adapts every linear layer; give it alone")
        return self


class TrainingSpec(SpecModel):
    epochs: float = Field(default=1, gt=0, description="Passes over the data set (ignored when maxSteps is set).")
    max_steps: int | None = Field(default=None, ge=1, description="Optimizer steps to run; overrides epochs.")
    batch_size: int = Field(
        default=8, ge=1, description="Micro-batch size per process, in examples (in rows of maxSeqLength with packing)."
    )
    max_tokens_per_batch: int | None = Field(
        default=None,
        ge=8,
        description="Cut micro-batches by tokens instead: as many examples (or packed rows) as fit in this many "
        "tokens, padding included; batchSize is then ignored. At least maxSeqLength. Unset on a GPU: batchSize "
        "examples, cut earlier where they would exceed a budget derived from the GPU's memory and the model.",
    )
    packing: bool = Field(
        default=False,
        description="causal-lm: concatenate examples into rows of up to maxSeqLength tokens; no example attends to "
        "another (position ids restart per example; variable-length flash attention or a block-diagonal mask).",
    )
    gradient_accumulation_steps: int = Field(default=1, ge=1, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(default=2.0e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: LrScheduler = Field(default=LrScheduler.cosine, description="Decay after warmup.")
    warmup_steps: int = Field(default=0, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(default=1.0, ge=0, description="Gradient clipping norm; 0 disables clipping.")
    max_seq_length: int = Field(default=1024, ge=8, description="Longest tokenized example; longer ones are truncated.")
    precision: Precision = Field(
        default=Precision.auto,
        description="auto: bf16 where the GPU has it, else fp16 with loss scaling; fp32 on CPU.",
    )
    gradient_checkpointing: bool = Field(
        default=False, description="Recompute the decoder layers' activations in the backward pass to save memory."
    )
    gradient_checkpointing_every_n_layers: int = Field(
        default=1,
        ge=1,
        description="With gradientCheckpointing: recompute only every n-th decoder layer (1: all; more: faster, "
        "more memory).",
    )
    attn_implementation: AttnImplementation = Field(
        default=AttnImplementation.auto,
        description="Attention kernel: auto (flash_attention_2 where installed on a GPU, else sdpa), "
        "flash_attention_2, sdpa or eager.",
    )
    compile: bool = Field(
        default=False,
        description="torch.compile each decoder layer (inductor fuses the norms, rotary embedding, activation "
        "and LoRA's element-wise work): for GPUs, after a compile of a minute or more at start; no faster on CPU. "
        "Where the compiler cannot run (no triton or C compiler), the layers run as they are, with a warning.",
    )
    group_by_length: bool = Field(
        default=True,
        description="Batch examples of similar length together (shuffled within windows) to avoid padding.",
    )
    seed: int = Field(default=42, description="Seed for weights, data order and dropout.")
    deterministic: bool = Field(
        default=False,
        description="Use deterministic kernels only (torch.use_deterministic_algorithms, a fixed cuBLAS workspace): "
        "a resume on GPU is then bitwise exact, at some speed; without it, GPU kernels add run-to-run noise.",
    )
    log_every_steps: int = Field(default=10, ge=1, description="Optimizer steps between metric lines.")
    eval_every_steps: int | None = Field(
        default=None,
        ge=1,
        description="Optimizer steps between evaluations of the eval set (there is always one at the end).",
    )
    merge_adapter: bool = Field(default=False, description="Also save the base model with the adapter merged in.")

    @model_validator(mode="after")
    def _a_token_budget_holds_the_longest_example(self) -> TrainingSpec:
        if self.max_tokens_per_batch is not None and self.max_tokens_per_batch < self.max_seq_length:
            raise ValueError(
                f"maxTokensPerBatch {self.max_tokens_per_batch} is below maxSeqLength {self.max_seq_length}: "
                "the longest example would not fit in a micro-batch; raise maxTokensPerBatch or lower maxSeqLength"
            )
        return self


class EvalMetric(str, Enum):
    eval_loss = "eval_loss"
    eval_perplexity = "eval_perplexity"
    eval_accuracy = "eval_accuracy"
    eval_f1 = "eval_f1"


# What an evaluation reports, by task (evaluation.py computes them).
EVAL_METRICS = {
    Task.causal_lm: ("eval_loss", "eval_perplexity"),
    Task.sequence_classification: ("eval_loss", "eval_accuracy", "eval_f1"),
}


class KeepBestSpec(SpecModel):
    metric: EvalMetric = Field(default=EvalMetric.eval_loss, description="The eval metric that decides.")
    greater_is_better: bool | None = Field(
        default=None, description="Default: false for eval_loss and eval_perplexity, true for the others."
    )

    def better(self, value: float, best: float | None) -> bool:
        greater = self.greater_is_better
        if greater is None:
            greater = self.metric not in (EvalMetric.eval_loss.value, EvalMetric.eval_perplexity.value)
        return best is None or (value > best if greater else value < best)


class CheckpointSpec(SpecModel):
    interval_steps: int = Field(default=100, ge=1, description="Optimizer steps between checkpoints.")
    keep_last: int = Field(default=3, ge=1, description="Complete checkpoints kept; older ones are deleted.")
    keep_best: KeepBestSpec | None = Field(
        default=None,
        description="Keep the adapter of the best evaluation as adapter-best/ beside adapter/ (needs an eval set).",
    )


class TrainingJobFields(SpecModel):
    """The fields a FineTuneJob spec and a trainer config share: what to fine-tune and how."""

    model: str = Field(min_length=1, description="Hub id or a path the workers can read.")
    task: Task = Field(default=Task.causal_lm, description="causal-lm or sequence-classification.")
    dataset: DatasetSpec = Field(description="Training data.")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA adapter settings.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Optimisation settings.")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="Checkpoint cadence.")

    @model_validator(mode="after")
    def _classification_data_for_classification_task(self) -> TrainingJobFields:
        is_classification = self.dataset.format == DatasetFormat.classification.value
        if is_classification != (self.task == Task.sequence_classification.value):
            raise ValueError(
                f"dataset.format {self.dataset.format!r} does not fit task {self.task!r}: "
                "use format classification with task sequence-classification, and only then"
            )
        keep_best = self.checkpoint.keep_best
        if keep_best is not None:
            if self.dataset.eval_path is None and not self.dataset.eval_fraction:
                raise ValueError("checkpoint.keepBest needs an eval set: set dataset.evalPath or dataset.evalFraction")
            reported = EVAL_METRICS[Task(self.task)]
            if keep_best.metric not in reported:
                raise ValueError(
                    f"checkpoint.keepBest.metric {keep_best.metric} is not reported for task {self.task}: "
                    f"use one of {', '.join(reported)}"
                )
        if self.training.packing and self.task != Task.causal_lm.value:
            raise ValueError("training.packing is for task causal-lm only (a classifier reads one example per row)")
        return self


class TrainerConfig(TrainingJobFields):
    """What one trainer process needs: the job's training fields plus where to write."""

    output_dir: str = Field(min_length=1, description="Where checkpoints/, adapter/ and metrics.json go.")

    def resume_fingerprint(self) -> str:
        """Hash of the fields that must not change across a resume (output_dir may move)."""
        fields = without_resumable_changes(self.model_dump(mode="json", by_alias=True))
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


# Fields a resume may change (camelCase, as in a config dump): where to write, how often to log and how many
# checkpoints to keep, and how the same computation is carried out (memory for compute, the attention kernel).
RESUMABLE_CHANGES = (
    ("outputDir",),
    ("training", "logEverySteps"),
    ("training", "evalEverySteps"),
    ("dataset", "evalPath"),
    ("training", "gradientCheckpointing"),
    ("training", "gradientCheckpointingEveryNLayers"),
    ("training", "attnImplementation"),
    ("training", "deterministic"),
    ("checkpoint", "keepLast"),
    ("checkpoint", "keepBest"),
)


def without_resumable_changes(dump: dict[str, Any]) -> dict[str, Any]:
    """A by-alias config dump without the fields of RESUMABLE_CHANGES (a copy; the dump is left as it is)."""
    dump = {key: (dict(value) if isinstance(value, dict) else value) for key, value in dump.items()}
    for *sections, name in RESUMABLE_CHANGES:
        holder = dump
        for section in sections:
            holder = holder.get(section, {})
        holder.pop(name, None)
    return dump


class ConfigError(Exception):
    """A configuration the trainer cannot run; its message names the field or file."""


def format_validation_error(error: ValidationError, prefix: str = "") -> str:
    """One line per problem, each naming the field by its YAML path."""
    lines = []
    for problem in error.errors():
        location = ".".join(str(part) for part in problem["loc"])
        lines.append(f"{prefix}{location}: {problem['msg']}")
    return "; ".join(lines)


def load_trainer_config(path: str | Path) -> TrainerConfig:
    """Read a trainer config (YAML or JSON); raise ConfigError naming the file and field."""
    path = Path(path)
    try:
        raw: Any = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping, not {type(raw).__name__}")
    try:
        return TrainerConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"config file {path}: {format_validation_error(e)}") from e
