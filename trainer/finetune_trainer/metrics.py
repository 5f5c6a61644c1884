"""What the trainer reports: metric lines on stdout, progress.json, metrics.json, TensorBoard, the
termination message, and MFU.

Only rank 0 reports. Progress hooks (add_progress_hook, run(on_progress=...), and in a pod the ConfigMap
and Prometheus reporters) receive the same ProgressReport (contract.py) as progress.json on every metric line
and checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import TypeAdapter

from .contract import (
    ATTEMPT_ENV,
    METRICS_FILE,
    PROGRESS_FILE,
    PROGRESS_REPORT_INTERVAL_SECONDS,
    TERMINATION_LOG_ENV,
    TERMINATION_LOG_PATH,
    Activity,
    InPlaceRestart,
    ProgressReport,
    utc_timestamp,
)
from .contract import termination_message as one_line_message
from .files import atomic_write_json, atomic_write_text
from .model import base_model, last_decoder_layer, on_targets_pays

if TYPE_CHECKING:
    from peft import PeftModel

log = logging.getLogger(__name__)

ProgressHook = Callable[[ProgressReport], None]
_progress_hooks: list[ProgressHook] = []


# The gang's in-place restarts so far (a JSON list of InPlaceRestart): pod 0's elastic agent gives it to its workers.
IN_PLACE_RESTARTS_ENV = "FINETUNE_IN_PLACE_RESTARTS"
_IN_PLACE_RESTARTS = TypeAdapter(list[InPlaceRestart])


def gang_fields(environ: Mapping[str, str]) -> dict[str, Any]:
    """What every progress report says of the gang: its attempt and its in-place restarts (the operator counts
    those from the reports)."""
    attempt = environ.get(ATTEMPT_ENV, "")
    try:
        restarts = _IN_PLACE_RESTARTS.validate_json(environ.get(IN_PLACE_RESTARTS_ENV) or "[]")
    except ValueError:
        log.warning("%s is not a list of in-place restarts; reporting none", IN_PLACE_RESTARTS_ENV)
        restarts = []
    return {"attempt": int(attempt) if attempt.isdigit() else None, "in_place_restarts": restarts}


def add_progress_hook(hook: ProgressHook) -> None:
    """Call hook(progress) on every progress update of rank 0 (a failing hook is logged, not fatal)."""
    _progress_hooks.append(hook)


def remove_progress_hook(hook: ProgressHook) -> None:
    if hook in _progress_hooks:
        _progress_hooks.remove(hook)


# Dense bf16/fp16 tensor-core peaks in FLOP/s, matched against torch.cuda.get_device_name (first match).
GPU_PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("V100", 125e12),
    ("T4", 65e12),
)


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The GPU's peak for half-precision matmuls, or None (CPU, fp32, an unknown GPU)."""
    if device.type != "cuda" or precision not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_PEAK_FLOPS if key in name), None)


@dataclass(frozen=True)
class FlopsModel:
    """Training FLOPs for LoRA: the frozen weights need the forward (2N) and the input gradients (2N) but
    no weight gradients, so about 4N per token instead of the usual 6N; plus causal attention's 6·L·d·s (a
    token attends to s/2 earlier ones on average: half of the 12·L·d·s a full s x s attention costs, as
    FlashAttention's benchmarks count it), and the LM head only where there are targets (4·N_head per
    supervised token). With the last layer on targets (model.LastLayerOnTargets) its queries, o_proj and MLP
    (last_layer_params) run only at the supervised tokens, whose attention spans the padded row (12·d·s
    each), in the micro-batches that take it (model.on_targets_pays; packed rows for flash attention's
    one-row kernel do not, and are counted as if they did)."""

    body_params: int  # matmul weights of the layers, excluding embeddings and the LM head
    head_params: int  # LM head (or classifier) weights
    layers: int
    hidden: int
    head_on_targets_only: bool
    last_layer_params: int = 0  # the last layer's weights that LastLayerOnTargets runs at targets only

    def step_flops(self, tokens: int, supervised: int, padded: int, samples: int) -> float:
        padded_length = padded / max(1, samples)
        head_tokens = supervised if self.head_on_targets_only else padded
        on_targets = self.last_layer_params if on_targets_pays(supervised, padded) else 0
        full_layers = self.layers - (1 if on_targets else 0)
        return (
            4 * (self.body_params - on_targets) * tokens
            + 4 * on_targets * supervised
            + 4 * self.head_params * head_tokens
            + 6 * full_layers * self.hidden * padded_length * tokens
            + (12 * self.hidden * padded_length * supervised if on_targets else 0)
        )


def flops_model(peft_model: PeftModel, head_on_targets_only: bool) -> FlopsModel:
    base = base_model(peft_model)
    config = base.config
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    head_params = head.weight.numel() if head is not None else 0
    embedding_params = sum(p.numel() for p in base.get_input_embeddings().parameters())  # its one weight
    total = sum(p.numel() for p in base.parameters())
    last = last_decoder_layer(base) if head_on_targets_only else None  # as SupervisedLoss decides
    on_targets = [last.self_attn.q_proj, last.self_attn.o_proj, last.mlp] if last is not None else []
    return FlopsModel(
        body_params=max(0, total - embedding_params - head_params),
        head_params=head_params,
        layers=getattr(config, "num_hidden_layers", 0) or 0,
        hidden=getattr(config, "hidden_size", 0) or 0,
        head_on_targets_only=head_on_targets_only,
        last_layer_params=sum(p.numel() for module in on_targets for p in module.parameters()),
    )


@dataclass(frozen=True)
class SessionRates:
    """This session's throughput over all ranks, for metrics.json."""

    samples_per_second: float
    tokens_per_second: float
    supervised_tokens_per_second: float
    padding_fraction: float | None
    mfu: float | None


@dataclass
class Counts:
    """Loss sum and token counts over a span of steps. On rank 0 after `globalize`, over all ranks."""

    loss_sum: float = 0.0
    samples: int = 0
    tokens: int = 0  # real (non-padding) tokens processed
    supervised: int = 0  # tokens (or examples, for classification) with a target
    padded: int = 0  # tokens including padding
    flops: float = 0.0

    def add(self, other: Counts) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    def values(self) -> list[float]:
        return [float(v) for v in asdict(self).values()]

    @classmethod
    def from_values(cls, values: Sequence[float]) -> Counts:
        loss_sum, samples, tokens, supervised, padded, flops = values
        return cls(loss_sum, int(samples), int(tokens), int(supervised), int(padded), flops)

    @property
    def loss(self) -> float | None:
        return self.loss_sum / self.supervised if self.supervised else None


class Meter:
    """The run's metric accounting: loss and counts per logging window, for the run and for this process.

    Counting a step costs no GPU sync (the loss stays a tensor until the window is folded); folding sums
    the window over ranks into rank 0 in one collective (`reduce`: a sum over ranks of a list of numbers).
    The window and the run's totals are saved with each checkpoint (state / load_state).
    """

    def __init__(
        self,
        flops: FlopsModel,
        peak_flops: float | None,
        world_size: int,
        is_main: bool,
        reduce: Callable[[list[float]], list[float]],
    ):
        self.flops = flops
        self.peak_flops_all_ranks = peak_flops * world_size if peak_flops else None
        self.is_main = is_main
        self.reduce = reduce
        self.window = Counts()  # since the last metric line; on rank 0 also other ranks' after a checkpoint
        self.window_seconds = 0.0
        self.window_loss: torch.Tensor | None = None  # this rank's loss sum since the window was folded
        self.totals = Counts()  # rank 0: the whole run, resumes included
        self.session = Counts()  # this process, since it started
        self.session_seconds = 0.0  # this process's time in train()
        self.last_loss: float | None = None  # rank 0: of the last metric line's window
        self.last_tokens_per_second: float | None = None
        self.stopwatch = Stopwatch()

    def start(self) -> None:
        self.stopwatch = Stopwatch()

    def count_step(self, batch_counts: Sequence[dict[str, int]], loss_sum: torch.Tensor) -> None:
        for c in batch_counts:
            flops = self.flops.step_flops(c["tokens"], c["supervised"], c["padded"], c["samples"])
            step = Counts(0.0, c["samples"], c["tokens"], c["supervised"], c["padded"], flops)
            self.window.add(step)
            self.session.add(step)
        self.window_loss = loss_sum if self.window_loss is None else self.window_loss + loss_sum

    def fold(self) -> None:
        """Sum the window's loss and counts over ranks into rank 0 (a collective; syncs the GPU once)."""
        loss = self.window_loss.item() if self.window_loss is not None else 0.0
        self.window_loss = None
        self.session.loss_sum += loss
        self.window.loss_sum += loss
        folded = Counts.from_values(self.reduce(self.window.values()))
        self.window = folded if self.is_main else Counts()
        elapsed = self.stopwatch.lap()
        self.window_seconds += elapsed
        self.session_seconds += elapsed

    def window_rates(self) -> dict[str, float | None]:
        """Rank 0, after fold: the window's loss and rates; the window then counts into the totals and restarts."""
        w, seconds = self.window, max(self.window_seconds, 1e-9)
        self.totals.add(w)
        self.last_loss, self.last_tokens_per_second = w.loss, w.tokens / seconds
        rates = {
            "loss": w.loss,
            "samples_per_second": w.samples / seconds,
            "tokens_per_second": w.tokens / seconds,
            "supervised_tokens_per_second": w.supervised / seconds,
            "padding_fraction": 1 - w.tokens / w.padded if w.padded else None,
            "mfu": self._mfu(w.flops, seconds),
        }
        self.window, self.window_seconds = Counts(), 0.0
        return rates

    def reset_window(self) -> None:
        self.window, self.window_seconds = Counts(), 0.0

    def session_rates(self) -> SessionRates:
        """Every rank (a collective): this session's throughput over all ranks."""
        s = Counts.from_values(self.reduce(self.session.values()))
        seconds = max(self.session_seconds, 1e-9)
        return SessionRates(
            samples_per_second=s.samples / seconds,
            tokens_per_second=s.tokens / seconds,
            supervised_tokens_per_second=s.supervised / seconds,
            padding_fraction=1 - s.tokens / s.padded if s.padded else None,
            mfu=self._mfu(s.flops, seconds),
        )

    def _mfu(self, flops: float, seconds: float) -> float | None:
        return flops / seconds / self.peak_flops_all_ranks if self.peak_flops_all_ranks else None

    def state(self) -> dict[str, Any]:
        """Rank 0, after fold: what a checkpoint keeps (the accumulators summed over ranks)."""
        return {"window": asdict(self.window), "window_seconds": self.window_seconds, "totals": asdict(self.totals)}

    def load_state(self, state: dict[str, Any]) -> None:
        if self.is_main:
            self.window = Counts(**state["window"])
            self.window_seconds = state["window_seconds"]
            self.totals = Counts(**state["totals"])


def format_progress(
    step: int,
    total_steps: int,
    epoch: float,
    loss: float | None,
    tokens_per_second: float | None,
    last_checkpoint_step: int | None,
    last_checkpoint_time: str | None,
    eval_metrics: dict[str, float] | None = None,
    *,
    best_step: int | None = None,
) -> ProgressReport:
    eval_metrics = eval_metrics or {}
    return ProgressReport(
        step=step,
        total_steps=total_steps,
        epoch=round(epoch, 4),
        loss=_finite(loss),
        tokens_per_second=_finite(tokens_per_second),
        eval_loss=_finite(eval_metrics.get("eval_loss")),
        eval_accuracy=_finite(eval_metrics.get("eval_accuracy")),
        last_checkpoint_step=last_checkpoint_step,
        last_checkpoint_time=last_checkpoint_time,
        best_step=best_step,
        activity=Activity.TRAINING,
    )


class Reporter:
    """Rank 0's outputs while training: JSON metric lines, progress.json, TensorBoard, progress hooks."""

    def __init__(
        self,
        output_dir: Path,
        enabled: bool,
        hooks: Sequence[ProgressHook] = (),
        before_write: Callable[[], None] = lambda: None,
    ):
        self.output_dir = Path(output_dir)
        self.enabled = enabled
        self.hooks = list(hooks)
        self.before_write = before_write  # raises to stop a fenced-off attempt's report (fence.py)
        self.gang = gang_fields(os.environ)
        self.tensorboard = _tensorboard_writer(self.output_dir / "tensorboard") if enabled else None
        self.first_report: tuple[float, int] | None = None  # (monotonic time, step) of this process's first report
        self.last: ProgressReport | None = None  # the latest report sent, which liveness repeats
        self.last_sent = -math.inf  # monotonic

    def metric_line(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        print(json.dumps({key: _finite(value) for key, value in metrics.items()}), flush=True)
        if self.tensorboard is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                    tag = f"eval/{key.removeprefix('eval_')}" if key.startswith("eval_") else f"train/{key}"
                    self.tensorboard.add_scalar(tag, value, metrics["step"])

    def progress(self, progress: ProgressReport) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        progress = progress.model_copy(update=self.gang)
        if progress.activity in (None, Activity.TRAINING):
            progress = progress.model_copy(update={"eta_seconds": self._eta_seconds(progress, now)})
        self.before_write()
        self.last, self.last_sent = progress, now
        atomic_write_text(self.output_dir / PROGRESS_FILE, progress.to_json() + "\n")
        for hook in [*_progress_hooks, *self.hooks]:
            try:
                hook(progress)
            except Exception:
                log.exception("progress hook %r failed", hook)

    def alive(self, activity: str, step: int | None = None) -> None:
        """Liveness between full reports: the last report again with this activity (and a new step), at once for
        a new activity, else at most every PROGRESS_REPORT_INTERVAL_SECONDS. Called by the thread doing the
        work, so a hang stops it (restartPolicy.progressDeadlineSeconds watches it)."""
        if not self.enabled:
            return
        last = self.last or ProgressReport()
        if activity == last.activity and time.monotonic() - self.last_sent < PROGRESS_REPORT_INTERVAL_SECONDS:
            return
        update: dict[str, Any] = {"activity": activity, "time": utc_timestamp()}
        if step is not None:
            update["step"] = step
        self.progress(last.model_copy(update=update))

    def _eta_seconds(self, progress: ProgressReport, now: float) -> int | None:
        """Remaining steps at this process's pace so far (steps restored from a checkpoint do not count)."""
        if self.first_report is None:
            self.first_report = (now, progress.step)
        started_at, started_step = self.first_report
        if not progress.total_steps or progress.step <= started_step:
            return None
        pace = (now - started_at) / (progress.step - started_step)
        return int(max(progress.total_steps - progress.step, 0) * pace)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None


def _tensorboard_writer(path: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # the tensorboard package is optional
        return None
    return SummaryWriter(str(path))


@dataclass
class RunSummary:
    """metrics.json: DESIGN.md's keys plus what helps to judge a run."""

    global_step: int
    total_steps: int
    epoch: float
    train_loss: float | None  # over every supervised token of the run, resumes included
    final_loss: float | None  # over the last logging window
    train_samples_per_second: float
    train_tokens_per_second: float
    train_supervised_tokens_per_second: float
    train_runtime_seconds: float  # this process's training time (since its start or resume)
    restarts: int
    resumed_from_step: int | None
    world_size: int
    precision: str
    trainable_parameters: int
    total_parameters: int
    padding_fraction: float | None
    mfu: float | None = None
    peak_memory_bytes: int | None = None
    last_checkpoint_step: int | None = None
    attn_implementation: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def write(self, output_dir: Path) -> None:
        data = {key: _finite(value) for key, value in asdict(self).items() if key != "extra"}
        atomic_write_json(Path(output_dir) / METRICS_FILE, {**data, **self.extra})


def write_termination_message(message: str, environ: Mapping[str, str] | None = None) -> None:
    """One line for `kubectl describe pod`: to $FINETUNE_TERMINATION_LOG, else /dev/termination-log."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    path = env.get(TERMINATION_LOG_ENV) or TERMINATION_LOG_PATH
    if path == TERMINATION_LOG_PATH and not (os.path.exists(path) and os.access(path, os.W_OK)):
        return
    line = one_line_message(message)
    try:
        if path == TERMINATION_LOG_PATH:
            Path(path).write_text(line + "\n")
        else:
            atomic_write_text(Path(path), line + "\n")
    except OSError as e:
        print(f"cannot write the termination message to {path}: {e}", file=sys.stderr)


class Stopwatch:
    def __init__(self) -> None:
        self.started = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self.started = now - self.started, now
        return elapsed


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
