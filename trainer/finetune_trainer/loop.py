"""The LoRA fine-tuning recipe: setup, train, save_checkpoint, save_outputs, cleanup.

    python -m finetune_trainer --config trainer.yaml                       # one process (or NPROC_PER_NODE)
    torchrun --nproc-per-node 4 -m finetune_trainer --config trainer.yaml  # under torchrun

One optimizer step: take the next `gradientAccumulationSteps` micro-batches of this rank, agree with all
ranks in one small CPU collective on the number of supervised tokens and on whether to stop (SIGTERM),
run forward/backward on each micro-batch (all but the last under DDP's no_sync), each loss being
sum / (supervised tokens over all micro-batches and ranks) so every token weighs the same, then clip,
step and schedule. Checkpoints every checkpoint.intervalSteps, when stopping, and at the end.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import signal
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from . import batching, checkpoint, memory
from . import model as model_lib
from .batching import Collator, DataPosition, MicroBatchOrder, StepBatches
from .config import ConfigError, TrainerConfig, without_resumable_changes
from .contract import BEST_ADAPTER_DIR, CHECKPOINTS_DIR, Activity, utc_timestamp
from .data import Example, TrainingData, load_training_data, split_held_out
from .distributed import (
    DistContext,
    LaunchEnv,
    all_gather,
    all_reduce_sum,
    barrier,
    broadcast_from_main,
    gather_to_main,
    init_distributed,
    raise_on_every_rank,
    shutdown,
)
from .evaluation import evaluate
from .fence import AttemptFence
from .files import check_writable, publish_dir, temporary_dir_for
from .metrics import Meter, ProgressHook, Reporter, RunSummary, flops_model, format_progress, peak_flops

log = logging.getLogger(__name__)


class StopRequest:
    """Set by SIGTERM (or SIGINT); read by the loop at step boundaries, never acted on in the handler."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> StopRequest:
        import threading

        if threading.current_thread() is not threading.main_thread():
            log.warning("not on the main thread: SIGTERM cannot be caught, so it will not save a checkpoint")
            return self
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: give up on the graceful stop
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        log.warning("%s received: stopping at the next step boundary after saving a checkpoint", self.signal_name)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


@dataclass
class Progress:
    """Where the run is; saved in every checkpoint."""

    step: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    restarts: int = 0
    resumed_from_step: int | None = None
    last_checkpoint_step: int | None = None
    last_checkpoint_time: str | None = None
    best_metric: float | None = None  # checkpoint.keepBest: the best evaluation so far, and its step
    best_step: int | None = None
    token_cap: int | None = None  # the GPU memory budget micro-batches were cut by (memory.py)


class Recipe:
    """setup() builds all the state, train() runs the steps, save_outputs() writes the results, cleanup().

    Every attribute is created in __init__ (what the config and env say) or in setup() (what loading the
    data, the model and a checkpoint gives); nothing else adds any.
    """

    def __init__(
        self,
        config: TrainerConfig,
        launch_env: LaunchEnv,
        stop: StopRequest | None = None,
        progress_hooks: Sequence[ProgressHook] = (),
    ):
        self.config = config
        self.training = config.training
        self.launch_env = launch_env
        self.stop = stop or StopRequest()
        self.progress_hooks = list(progress_hooks)
        self.output_dir = Path(config.output_dir)
        self.checkpoints_dir = self.output_dir / CHECKPOINTS_DIR
        self.progress = Progress()
        self.last_grad_norm: torch.Tensor | None = None
        self.last_eval: dict[str, float] = {}  # the latest evaluation's metrics (eval_loss, ...)
        self.valid_checkpoints: set[Path] = set()  # written or verified by this process: retention trusts them
        self._ctx: DistContext | None = None  # set first in setup(); cleanup() needs to know whether it was
        self._reporter: Reporter | None = None
        self.fence = AttemptFence(self.output_dir)  # rank 0 claims the output folder for this attempt in setup()

    @property
    def ctx(self) -> DistContext:
        if self._ctx is None:
            raise RuntimeError("Recipe.setup() has not initialised the process group yet")
        return self._ctx

    @property
    def reporter(self) -> Reporter:
        if self._reporter is None:
            raise RuntimeError("Recipe.setup() has not created the reporter yet")
        return self._reporter

    # --- setup ---------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Everything that can fail fast does so here: config, data, model, the checkpoint to resume."""
        training = self.training
        if training.deterministic:
            use_deterministic_algorithms()
        self._ctx = ctx = init_distributed(
            self.launch_env, should_stop=lambda: self.stop.requested, run_dir=str(self.output_dir)
        )
        self.precision = model_lib.resolve_precision(training.precision, ctx.device)
        self.attn_implementation = model_lib.resolve_attn_implementation(
            training.attn_implementation, ctx.device, self.precision
        )
        self.causal = self.config.task == "causal-lm"
        self._check_output_writable()
        if ctx.is_main:
            self.fence.claim()
        # Created first: loading reports liveness, so the progress deadline does not take it for a stall.
        self._reporter = Reporter(
            self.output_dir, enabled=ctx.is_main, hooks=self.progress_hooks, before_write=self.fence.check
        )
        self.reporter.alive(Activity.LOADING)
        self.model_source = self._fetch_model()
        self.tokenizer = model_lib.load_tokenizer(self.model_source)
        self.data, self.eval_examples = self._load_data()
        resume_from = self._checkpoint_to_resume()
        saved_progress = _resumed_progress(resume_from[0]) if resume_from is not None else None
        self.token_cap = self._token_cap(saved_progress)
        self.order = MicroBatchOrder(
            self.data.lengths,
            training.batch_size,
            training.seed,
            training.group_by_length,
            max_tokens=training.max_tokens_per_batch,
            pack_to=training.max_seq_length if training.packing else None,
            token_cap=self.token_cap,
        )
        self.stride = training.gradient_accumulation_steps * ctx.world_size
        self._check_one_step_of_data()
        on_gpu = ctx.device.type == "cuda"
        self.eval_collator = Collator(self.tokenizer.pad_token_id, self.causal, 8 if on_gpu else 1)
        self.batches = StepBatches(
            self.data.examples,
            self.order,
            self._collator(),
            training.gradient_accumulation_steps,
            ctx.world_size,
            ctx.rank,
            on_gpu=ctx.device.type == "cuda",
        )

        self.reporter.alive(Activity.LOADING)
        torch.manual_seed(training.seed)  # the same adapter initialisation on every rank
        self.peft_model = model_lib.load_model(
            self.config,
            self.tokenizer,
            self.precision,
            ctx.device,
            self.data.label_names,
            self.attn_implementation,
            source=self.model_source,
        )
        self.loss_module = model_lib.SupervisedLoss(self.peft_model, self.causal)
        if training.compile:
            model_lib.compile_decoder_layers(self.peft_model, ctx.device)
        self.ddp = _wrap_ddp(self.loss_module, ctx) if ctx.distributed else None
        self.trainable = [p for p in self.peft_model.parameters() if p.requires_grad]
        self.optimizer = model_lib.make_optimizer(self.peft_model, training.learning_rate, training.weight_decay)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=self.precision.needs_grad_scaler)
        self.meter = Meter(
            flops_model(self.peft_model, self.loss_module.head_on_targets_only),
            peak_flops(ctx.device, self.precision.name),
            ctx.world_size,
            ctx.is_main,
            lambda values: all_reduce_sum(values, ctx),
        )

        if saved_progress is not None:
            self.progress = saved_progress
        self.progress.token_cap = self.token_cap
        self.total_steps = batching.total_steps(
            training.epochs, training.max_steps, self.order, self.stride, self.progress.step, self.progress.position
        )
        self.scheduler = model_lib.make_scheduler(
            self.optimizer, training.lr_scheduler, training.warmup_steps, self.total_steps
        )
        if resume_from is not None:
            self.restore(*resume_from)
        else:
            _seed_everything(training.seed + ctx.rank)  # dropout differs per rank, as it should

        if ctx.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        log.info(
            "%d examples (%d held out for evaluation), %d optimizer steps (from step %d), %d processes, "
            "precision %s, attention %s%s%s%s",
            len(self.data.examples),
            len(self.eval_examples),
            self.total_steps,
            self.progress.step,
            ctx.world_size,
            self.precision.name,
            self.attn_implementation,
            f", packed ({100 * self.order.fill_rate():.1f}% of the rows' tokens filled)" if training.packing else "",
            ", gradient checkpointing" if training.gradient_checkpointing else "",
            f", micro-batches capped at {self.token_cap} tokens (GPU memory)" if self.token_cap else "",
        )

    def _token_cap(self, saved: Progress | None) -> int | None:
        """The cap micro-batches are cut by (memory.choose_token_cap): none with maxTokensPerBatch, else this
        GPU's memory budget for the model, or on a resume the checkpoint's cap where it still fits."""
        training, device = self.training, self.ctx.device
        if training.max_tokens_per_batch is not None:
            return None
        saved_cap = saved.token_cap if saved is not None else None
        budget = self._gpu_token_budget() if device.type == "cuda" else None
        cap = memory.choose_token_cap(budget, saved_cap, training.max_seq_length)
        if saved_cap is not None and cap != saved_cap:
            log.warning(
                "this GPU's memory budget (%d tokens) is below the checkpoint's (%d): the data order changes, "
                "and the result will not match an uninterrupted run exactly",
                cap,
                saved_cap,
            )
        return cap

    def _gpu_token_budget(self) -> int | None:
        from transformers import AutoConfig

        try:
            shape = memory.ModelShape.from_config(AutoConfig.from_pretrained(self.model_source))
        except (AttributeError, OSError, ValueError) as e:
            log.warning("no memory budget for micro-batches (the model's config does not tell its shape: %s)", e)
            return None
        training = self.training
        return memory.token_budget(
            torch.cuda.get_device_properties(self.ctx.device).total_memory,
            shape,
            self.precision.weights_dtype.itemsize,
            training.gradient_checkpointing,
            training.gradient_checkpointing_every_n_layers,
        )

    def _check_output_writable(self) -> None:
        """Rank 0 (the only writer) writes a test file in outputDir before anything else is loaded."""
        error = None
        if self.ctx.is_main:
            try:
                check_writable(self.output_dir)
            except OSError as e:
                error = (
                    f"spec.storage: the trainer cannot write its output directory {self.output_dir} "
                    f"({e.strerror or e}); the claim must be writable by the worker uid {os.getuid()} or its "
                    f"fsGroup (groups {os.getgroups()}); storage that ignores fsGroup (some NFS) needs its "
                    "export owned by or open to that uid"
                )
        raise_on_every_rank([broadcast_from_main(error, self.ctx)])

    def _fetch_model(self) -> str:
        """Where this process reads the base model: a path every worker must be able to read, or a hub id's
        snapshot in the pod's cache. A permanent refusal on any rank ends every rank with exit 2."""
        name, error, source = self.config.model, None, self.config.model
        try:
            error = model_lib.unreadable_model_path(name)
            if error is None:
                source = model_lib.fetch_model(name)
        except ConfigError as e:
            error = str(e)
        raise_on_every_rank(all_gather(error, self.ctx))
        return source

    def _load_data(self) -> tuple[TrainingData, list[Example]]:
        """Rank 0 reads and tokenizes the data set (and the eval set) once and sends the examples to the
        others: only worker-0 needs to see the files, and an error in them (file and line named) ends
        every rank with exit 2."""
        payload: dict[str, Any] | None = None
        if self.ctx.is_main:
            try:
                payload = {"data": self._read_data()}
            except ConfigError as e:
                payload = {"error": str(e)}
        payload = broadcast_from_main(payload, self.ctx)
        raise_on_every_rank([payload.get("error")])
        return payload["data"]

    def _read_data(self) -> tuple[TrainingData, list[Example]]:
        dataset, training = self.config.dataset, self.training
        data = load_training_data(
            dataset.path, dataset.format, self.tokenizer, training.max_seq_length, self.config.task
        )
        if dataset.eval_path is not None:
            eval_data = load_training_data(
                dataset.eval_path,
                dataset.format,
                self.tokenizer,
                training.max_seq_length,
                self.config.task,
                label_names=data.label_names,
            )
            return data, eval_data.examples
        if dataset.eval_fraction > 0:
            data, held_out = split_held_out(data, dataset.eval_fraction, training.seed)
            return data, held_out.examples
        return data, []

    def _collator(self) -> Collator:
        on_gpu = self.ctx.device.type == "cuda"
        return Collator(
            self.tokenizer.pad_token_id,
            self.causal,
            8 if on_gpu else 1,  # tensor cores like multiples of 8; on CPU padding would only cost
            pack_to=self.training.max_seq_length if self.training.packing else None,
            one_row=self.attn_implementation == "flash_attention_2",
        )

    def _check_one_step_of_data(self) -> None:
        training = self.training
        if batching.steps_per_epoch(self.order, training.gradient_accumulation_steps, self.ctx.world_size) == 0:
            size = (
                f"maxTokensPerBatch {training.max_tokens_per_batch}"
                if training.max_tokens_per_batch
                else f"batchSize {training.batch_size}"
            )
            raise ConfigError(
                f"dataset.path {self.config.dataset.path}: {len(self.data.examples)} usable examples make "
                f"{self.order.count(0)} micro-batches, fewer than one optimizer step needs (training.{size} x "
                f"gradientAccumulationSteps {training.gradient_accumulation_steps} x {self.ctx.world_size} "
                "processes); use more data or smaller batches"
            )

    def _checkpoint_to_resume(self) -> tuple[checkpoint.Checkpoint, dict[str, torch.Tensor]] | None:
        """The newest checkpoint that verifies, with its adapter weights; refuse one of another config.

        Rank 0 chooses and reads it, and sends it to the others: they need not see the storage, and a
        shared file system is read once rather than by every rank.
        """
        payload: dict[str, Any] | None = None
        if self.ctx.is_main:
            checkpoint.remove_unfinished(self.checkpoints_dir)
            found = checkpoint.latest_valid_checkpoint(self.checkpoints_dir)
            if found is not None:
                path, manifest = found
                if manifest["fingerprint"] != self.config.resume_fingerprint():
                    payload = {"error": self._config_changed_message(path)}
                else:
                    self.valid_checkpoints.add(path)
                    payload = {
                        "checkpoint": checkpoint.load_checkpoint(path, manifest),
                        "adapter": checkpoint.load_adapter_weights(path),
                    }
        payload = broadcast_from_main(payload, self.ctx)
        if payload is None:
            return None
        if "error" in payload:
            raise ConfigError(payload["error"])
        return payload["checkpoint"], payload["adapter"]

    def _config_changed_message(self, path: Path) -> str:
        try:
            old = checkpoint.load_checkpoint(path, checkpoint.verify_checkpoint(path)).config
            changes = checkpoint.changed_fields(
                without_resumable_changes(old), without_resumable_changes(_config_dump(self.config))
            )
        except Exception:  # the message must not fail; fall back to saying less
            changes = []
        what = f"these fields differ: {', '.join(changes)}" if changes else "its config fingerprint differs"
        return (
            f"checkpoint {path} was written by a different config ({what}); a run resumes only with the "
            f"config it started with: restore those fields, or use a new outputDir to start over"
        )

    # --- checkpoint state: built in one place, restored in one place --------------------------------

    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "progress": dataclasses.asdict(self.progress),
            "world_size": self.ctx.world_size,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "meter": self.meter.state(),
        }

    def restore(self, saved: checkpoint.Checkpoint, adapter_weights: dict[str, torch.Tensor]) -> None:
        """Load what checkpoint_state() saved (progress is read earlier, by _resumed_progress)."""
        from peft import set_peft_model_state_dict

        ctx, state = self.ctx, saved.trainer_state
        path = checkpoint.step_dir(self.checkpoints_dir, saved.step)
        set_peft_model_state_dict(self.peft_model, adapter_weights)
        if state["world_size"] != ctx.world_size:
            log.warning(
                "checkpoint %s was written by %d processes, this run has %d: continuing from micro-batch %d of "
                "epoch %d; the result will not match an uninterrupted run exactly",
                path,
                state["world_size"],
                ctx.world_size,
                self.progress.position.micro_batch,
                self.progress.position.epoch,
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.meter.load_state(state["meter"])  # on rank 0: the accumulators were summed over ranks when saved
        if ctx.rank < len(saved.rng_states):
            checkpoint.restore_rng_state(saved.rng_states[ctx.rank], ctx.device)
        else:
            _seed_everything(self.training.seed + ctx.rank + 7919 * saved.step)
        log.info("resumed from %s (step %d, restart %d)", path, saved.step, self.progress.restarts)

    # --- training ------------------------------------------------------------------------------------

    def train(self) -> str:
        """Run to total_steps ("done") or to a stop request ("stopped", after checkpointing)."""
        self.meter.start()
        while self.progress.step < self.total_steps:
            batches, next_position = self.batches.take(self.progress.position)
            global_supervised, stop = self._agree_on_step(batches)
            if stop:
                self._stop_at_step_boundary()
                return "stopped"
            self._optimizer_step(batches, global_supervised)
            self.progress.step += 1
            self.progress.position = next_position
            step = self.progress.step
            self.reporter.alive(Activity.TRAINING, step)
            if step % self.training.log_every_steps == 0 or step == self.total_steps:
                self._log_metrics()
            eval_every = self.training.eval_every_steps
            if self.eval_examples and (step == self.total_steps or (eval_every and step % eval_every == 0)):
                self._evaluate()
            if step % self.config.checkpoint.interval_steps == 0 and step != self.total_steps:
                self.save_checkpoint()
        if self.progress.last_checkpoint_step != self.progress.step:
            self.save_checkpoint()
        return "done"

    def _evaluate(self) -> None:
        """Every rank: the eval set's metrics, reduced over ranks; rank 0 prints them as a metric line."""
        self.reporter.alive(Activity.EVALUATING)
        self.last_eval = evaluate(
            self.loss_module,
            self.eval_examples,
            self.eval_collator,
            self.training.batch_size,
            self.ctx.rank,
            self.ctx.world_size,
            self.ctx.device,
            self.precision.autocast_dtype,
            lambda values: all_reduce_sum(values, self.ctx),
            len(self.data.label_names) if self.data.label_names else None,
        )
        if self.ctx.is_main:
            self.reporter.metric_line({"step": self.progress.step, **self.last_eval})
            self._report_progress()
        keep_best = self.config.checkpoint.keep_best
        value = self.last_eval[keep_best.metric] if keep_best is not None else math.nan
        if keep_best is not None and math.isfinite(value) and keep_best.better(value, self.progress.best_metric):
            self.progress.best_metric, self.progress.best_step = value, self.progress.step
            if self.ctx.is_main:
                self.fence.check()
                self._save_dir(self.output_dir / BEST_ADAPTER_DIR, self._save_adapter)
                log.info("best %s so far (%.4g): adapter saved as %s", keep_best.metric, value, BEST_ADAPTER_DIR)

    def _agree_on_step(self, batches: list[dict[str, Any]]) -> tuple[int, bool]:
        """One collective per step: the supervised tokens of all ranks, and whether any rank must stop."""
        supervised = sum(batch["counts"]["supervised"] for batch in batches)
        total, stops = all_reduce_sum([supervised, int(self.stop.requested)], self.ctx, torch.int64)
        return int(total), stops > 0

    def _optimizer_step(self, batches: list[dict[str, Any]], global_supervised: int) -> None:
        """Forward and backward over the step's micro-batches, then unscale, clip, step and schedule."""
        loss_sum = accumulate_gradients(
            self.ddp if self.ddp is not None else self.loss_module,
            batches,
            global_supervised,
            self.ctx.world_size,
            self.ctx.device,
            self.precision.autocast_dtype,
            self.scaler,
        )
        self.scaler.unscale_(self.optimizer)
        if self.training.max_grad_norm > 0:
            self.last_grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.training.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.meter.count_step([batch["counts"] for batch in batches], loss_sum)

    def _log_metrics(self) -> None:
        self.meter.fold()
        if not self.ctx.is_main:
            self.meter.reset_window()
            return
        line = {
            "step": self.progress.step,
            "total_steps": self.total_steps,
            "epoch": round(self._epoch(), 4),
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": self.last_grad_norm.item() if self.last_grad_norm is not None else None,
            **self.meter.window_rates(),
        }
        self.reporter.metric_line(line)
        self._report_progress()

    def _report_progress(self) -> None:
        self.reporter.progress(
            format_progress(
                self.progress.step,
                self.total_steps,
                self._epoch(),
                self.meter.last_loss,
                self.meter.last_tokens_per_second,
                self.progress.last_checkpoint_step,
                self.progress.last_checkpoint_time,
                self.last_eval,
                best_step=self.progress.best_step,
            )
        )

    def _epoch(self) -> float:
        position = self.progress.position
        return position.epoch + position.micro_batch / self.order.count(position.epoch)

    def _stop_at_step_boundary(self) -> None:
        log.warning(
            "stopping at step %d of %d (%s)", self.progress.step, self.total_steps, self.stop.signal_name or "peer"
        )
        if self.progress.step > (self.progress.last_checkpoint_step or 0):
            self.save_checkpoint()
        barrier(self.ctx)  # nobody exits (and gets its pod torn down) before rank 0 has written

    # --- saving --------------------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """Every rank: fold the accumulators into rank 0 and send it the RNG states; rank 0 writes."""
        self.reporter.alive(Activity.SAVING)
        self.meter.fold()
        rng_states = gather_to_main(checkpoint.capture_rng_state(self.ctx.device), self.ctx)
        now = utc_timestamp()
        self.progress.last_checkpoint_step, self.progress.last_checkpoint_time = self.progress.step, now
        if rng_states is not None:  # rank 0: the writer, which gather_to_main gave every rank's state
            saved = checkpoint.Checkpoint(
                step=self.progress.step,
                fingerprint=self.config.resume_fingerprint(),
                trainer_state=self.checkpoint_state(),
                rng_states=rng_states,
                config=_config_dump(self.config),
            )
            self.fence.check()  # an older attempt's rank 0 must neither publish nor apply retention
            path = checkpoint.save_checkpoint(
                self.checkpoints_dir, saved, lambda directory: self.peft_model.save_pretrained(str(directory))
            )
            self.valid_checkpoints.add(path)
            checkpoint.apply_retention(self.checkpoints_dir, self.config.checkpoint.keep_last, self.valid_checkpoints)
            log.info("saved checkpoint %s", path)
            self._report_progress()

    def save_outputs(self) -> RunSummary | None:
        """Rank 0: adapter/ (and merged/), metrics.json, the final progress.json. Every rank waits for it."""
        summary = self._summary()
        self.reporter.alive(Activity.SAVING)
        if self.ctx.is_main:
            self.fence.check()
            self._save_dir(self.output_dir / "adapter", self._save_adapter)
            if self.training.merge_adapter:
                self._save_dir(self.output_dir / "merged", self._save_merged)
            summary.write(self.output_dir)
            self._report_progress()
        barrier(self.ctx)
        return summary

    def _save_adapter(self, path: Path) -> None:
        """The adapter, the tokenizer and, for a classifier, the base config with its label names (id2label,
        label2id), so that AutoConfig.from_pretrained(path) tells which class id is which label."""
        self.peft_model.save_pretrained(str(path))
        self.tokenizer.save_pretrained(path)
        if self.data.label_names:
            model_lib.base_model(self.peft_model).config.save_pretrained(path)

    def _save_merged(self, path: Path) -> None:
        merged = self.peft_model.merge_and_unload()
        merged.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    @staticmethod
    def _save_dir(final: Path, fill: Callable[[Path], None]) -> None:
        temporary = temporary_dir_for(final)
        fill(temporary)
        publish_dir(temporary, final)

    def _summary(self) -> RunSummary:
        """Every rank (a collective): metrics.json's figures."""
        rates = self.meter.session_rates()
        trainable, total = model_lib.count_parameters(self.peft_model)
        peak_memory = torch.cuda.max_memory_allocated(self.ctx.device) if self.ctx.device.type == "cuda" else None
        return RunSummary(
            global_step=self.progress.step,
            total_steps=self.total_steps,
            epoch=round(self._epoch(), 4),
            train_loss=self.meter.totals.loss,
            final_loss=self.meter.last_loss,
            train_samples_per_second=rates.samples_per_second,
            train_tokens_per_second=rates.tokens_per_second,
            train_supervised_tokens_per_second=rates.supervised_tokens_per_second,
            train_runtime_seconds=round(self.meter.session_seconds, 3),
            restarts=self.progress.restarts,
            resumed_from_step=self.progress.resumed_from_step,
            world_size=self.ctx.world_size,
            precision=self.precision.name,
            trainable_parameters=trainable,
            total_parameters=total,
            padding_fraction=rates.padding_fraction,
            mfu=rates.mfu,
            peak_memory_bytes=peak_memory,
            last_checkpoint_step=self.progress.last_checkpoint_step,
            attn_implementation=self.attn_implementation,
            extra={**self.last_eval, **self._best_summary()},
        )

    def _best_summary(self) -> dict[str, Any]:
        keep_best = self.config.checkpoint.keep_best
        if keep_best is None:
            return {}
        progress = self.progress
        return {"best_metric": keep_best.metric, "best_value": progress.best_metric, "best_step": progress.best_step}

    def termination_message(self, outcome: str) -> str:
        step, total = self.progress.step, self.total_steps
        saved = self.progress.last_checkpoint_step  # None only when stopped before a first step was saved
        where = "no checkpoint" if saved is None else f"checkpoint {checkpoint.step_dir(self.checkpoints_dir, saved)}"
        loss = self.meter.last_loss
        loss_text = f", loss {loss:.4f}" if loss is not None else ""
        if outcome == "stopped":
            stopper = self.stop.signal_name or "a peer"
            return f"stopped by {stopper} at step {step}/{total}; {where}{loss_text}; a restart resumes there"
        return f"done: step {step}/{total}, {where}, adapter {self.output_dir / 'adapter'}{loss_text}"

    def cleanup(self) -> None:
        if self.training.deterministic:
            torch.use_deterministic_algorithms(False)  # a process setting: leave it as found for a caller
        if self._reporter is not None:
            self._reporter.close()
        shutdown(self._ctx)


def _resumed_progress(saved: checkpoint.Checkpoint) -> Progress:
    """Where a checkpoint's run was, counted as one more restart."""
    progress = dict(saved.trainer_state["progress"])
    progress["position"] = DataPosition(**progress["position"])
    return dataclasses.replace(
        Progress(**progress),
        restarts=progress["restarts"] + 1,
        resumed_from_step=saved.step,
        last_checkpoint_step=saved.step,
        last_checkpoint_time=saved.created,
    )


def accumulate_gradients(
    model: torch.nn.Module,
    batches: list[dict[str, Any]],
    global_supervised: int,
    world_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler,
) -> torch.Tensor:
    """Forward and backward over one step's micro-batches; returns the summed loss (a tensor: no sync).

    Each micro-batch's loss sum is divided by the supervised tokens of the whole step on all ranks and
    multiplied by world_size (DDP averages over ranks), so the gradient is that of the mean over every
    supervised token of the step: long and short micro-batches weigh by their tokens, not equally.
    Gradients are all-reduced only after the last micro-batch (DDP's no_sync before it).
    """
    scale = world_size / global_supervised
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for i, batch in enumerate(batches):
        inputs = {k: _to(v, device) for k, v in batch.items() if k != "counts"}
        last = i == len(batches) - 1
        try:
            with model.no_sync() if isinstance(model, DistributedDataParallel) and not last else nullcontext():
                with autocast:
                    micro_loss = model(**inputs)
                scaler.scale(micro_loss * scale).backward()
        except torch.cuda.OutOfMemoryError as e:
            raise OutOfMemory(batch["counts"]["padded"], e) from e
        loss_sum += micro_loss.detach()
    return loss_sum


class OutOfMemory(ConfigError):
    """A micro-batch ran out of GPU memory: permanent (exit 2), as the same batch would on every attempt."""

    def __init__(self, tokens: int, error: BaseException):
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        super().__init__(f"CUDA out of memory: {memory.knobs_message(tokens)} ({first_line})")


def _to(value: Any, device: torch.device) -> Any:
    """A batch entry on the device (tensors; plain numbers such as max_length_q stay as they are)."""
    return value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value


def _wrap_ddp(module: torch.nn.Module, ctx: DistContext) -> DistributedDataParallel:
    """DDP over the trainable parameters only.

    DDP's constructor broadcasts every parameter and buffer from rank 0 so that all ranks start alike; the
    frozen base (16 GB for an 8B model) is already alike, as every rank loads it from the same files, so it
    and the buffers are left out of DDP altogether (it would never reduce their gradients anyway)."""
    import inspect

    frozen = [name for name, param in module.named_parameters() if not param.requires_grad]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        module, frozen + [name for name, _ in module.named_buffers()]
    )

    # Rotary tables and the like are constants: syncing buffers before every forward is a wasted collective.
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return DistributedDataParallel(
            module, device_ids=device_ids, gradient_as_bucket_view=True, forward_sync_buffers=False
        )
    return DistributedDataParallel(module, device_ids=device_ids, gradient_as_bucket_view=True, broadcast_buffers=False)


def use_deterministic_algorithms() -> None:
    """training.deterministic: the same kernels' results on every run, so a resume on GPU is bitwise exact.

    cuBLAS needs a fixed workspace for that, set before its first handle exists (so before the model loads);
    ops without a deterministic kernel warn, naming themselves, rather than fail a run that was correct."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy

        numpy.random.seed(seed % 2**32)
    except ImportError:
        pass


def _config_dump(config: TrainerConfig) -> dict[str, Any]:
    return config.model_dump(mode="json", by_alias=True)
