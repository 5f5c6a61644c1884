"""The contract between the operator and the trainer, in one place that both sides import.

Exit codes, the env the operator injects, the files a run writes, the termination message and the progress
report are agreed here and nowhere else; tests/unit/test_contract.py fails when either side strays. Only
pydantic and the standard library: the operator imports this without torch, the trainer without kopf.
"""

from __future__ import annotations

from datetime import datetime, timezone
from enum import IntEnum

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class ExitCode(IntEnum):
    """What a trainer's exit code tells the operator (DESIGN.md, "Trainer contract")."""

    DONE = 0
    RETRYABLE = 1  # and any code not listed here
    PERMANENT = 2  # bad config or data: the job fails at once, no restart is spent
    PEER_STALLED = 3  # retryable: a collective timed out waiting for a peer rank (the restart's reason: Stalled)
    STOPPED = 143  # SIGTERM: checkpointed and exited, 128 + 15 as a container runtime reports it


def exit_code_of(returncode: int) -> int:
    """A process's exit code as a container runtime and a shell report it: killed by signal N is 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


# The distributed wiring, as torchrun and Kubeflow's PyTorchJob name it.
WIRING_ENV = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "WORLD_SIZE",
    "RANK",
    "NNODES",
    "NODE_RANK",
    "NPROC_PER_NODE",
    "PET_NNODES",
    "PET_NPROC_PER_NODE",
    "PET_NODE_RANK",
    "PET_MASTER_ADDR",
    "PET_MASTER_PORT",
    "PYTHONUNBUFFERED",
)
# What the operator tells the trainer about the job it belongs to.
CONFIG_ENV = "FINETUNE_CONFIG"
ATTEMPT_ENV = "FINETUNE_ATTEMPT"
JOB_NAME_ENV = "FINETUNE_JOB_NAME"
NAMESPACE_ENV = "FINETUNE_NAMESPACE"
PROGRESS_CONFIG_MAP_ENV = "FINETUNE_PROGRESS_CONFIG_MAP"
# spec.gpusPerWorker: a worker that asked for GPUs and sees none (or too few) exits 2 at once.
GPUS_PER_WORKER_ENV = "FINETUNE_GPUS_PER_WORKER"
# spec.restartPolicy.strategy, and what the pod's elastic agent needs to restart the gang in place.
RESTART_STRATEGY_ENV = "FINETUNE_RESTART_STRATEGY"  # a RestartStrategy
RUN_ID_ENV = "FINETUNE_RUN_ID"  # the gang's rendezvous id (job uid and attempt): an older gang cannot join
MAX_IN_PLACE_RESTARTS_ENV = "FINETUNE_MAX_IN_PLACE_RESTARTS"  # maxRestarts less the restarts spent so far
RESTARTS_SPENT_ENV = "FINETUNE_RESTARTS_SPENT"  # status.restarts when the pod was made: the backoff goes on from it
RESTART_BACKOFF_ENV = "FINETUNE_RESTART_BACKOFF_SECONDS"  # spec.restartPolicy.backoffSeconds
MAX_RESTART_BACKOFF_ENV = "FINETUNE_MAX_RESTART_BACKOFF_SECONDS"  # spec.restartPolicy.maxBackoffSeconds
RESTART_ENV = (
    RESTART_STRATEGY_ENV,
    RUN_ID_ENV,
    MAX_IN_PLACE_RESTARTS_ENV,
    RESTARTS_SPENT_ENV,
    RESTART_BACKOFF_ENV,
    MAX_RESTART_BACKOFF_ENV,
)
JOB_ENV = (
    CONFIG_ENV,
    ATTEMPT_ENV,
    JOB_NAME_ENV,
    NAMESPACE_ENV,
    PROGRESS_CONFIG_MAP_ENV,
    GPUS_PER_WORKER_ENV,
    *RESTART_ENV,
)
# User env (spec.template.env) may set none of these.
RESERVED_ENV = frozenset(WIRING_ENV + JOB_ENV)


class RestartStrategy:
    """spec.restartPolicy.strategy: what a failed training process costs the gang."""

    IN_PLACE = "InPlace"  # every pod's elastic agent restarts its processes; no pod is deleted or made
    RECREATE = "Recreate"  # the operator deletes the gang's pods and makes new ones


def restart_backoff(backoff_seconds: int, max_backoff_seconds: int, restarts: int) -> int:
    """Seconds before restart number `restarts` (1-based): doubling, capped. The operator waits this long before
    it makes a gang again, and the elastic agent before it restarts one in place."""
    return min(backoff_seconds * 2 ** max(restarts - 1, 0), max_backoff_seconds)


# Every collective's timeout, seconds (the operator sets it from spec.restartPolicy.progressDeadlineSeconds).
COLLECTIVE_TIMEOUT_ENV = "FINETUNE_COLLECTIVE_TIMEOUT"
DEFAULT_COLLECTIVE_TIMEOUT_SECONDS = 1800  # no progress deadline: PyTorch's own NCCL default is 600


def collective_timeout(progress_deadline_seconds: int) -> int:
    """A collective's timeout under a progress deadline (0: none): half of it, so that a rank hung inside a
    collective (a dead peer, a stuck NCCL ring) ends as an error in every waiting pod, retryably, before the
    operator would restart the gang as Stalled; a hang outside collectives is still the deadline's."""
    if not progress_deadline_seconds:
        return DEFAULT_COLLECTIVE_TIMEOUT_SECONDS
    return max(progress_deadline_seconds // 2, 15)


# Where the termination message goes: `kubectl describe pod` shows it.
TERMINATION_LOG_ENV = "FINETUNE_TERMINATION_LOG"
TERMINATION_LOG_PATH = "/dev/termination-log"
TERMINATION_MESSAGE_MAX_CHARS = 4000  # Kubernetes keeps at most 4096 bytes


def termination_message(text: str) -> str:
    """The one line a pod's termination message holds: whitespace folded, cut to what Kubernetes keeps."""
    return " ".join(text.split())[:TERMINATION_MESSAGE_MAX_CHARS]


# The files of a run's output directory.
CHECKPOINTS_DIR = "checkpoints"
ADAPTER_DIR = "adapter"
BEST_ADAPTER_DIR = "adapter-best"  # checkpoint.keepBest's adapter, beside adapter/
METRICS_FILE = "metrics.json"
PROGRESS_FILE = "progress.json"
PROGRESS_KEY = PROGRESS_FILE  # the progress ConfigMap's data key holds the same report

# How often the trainer reports at most while it is alive (steps between metric lines, or liveness while it
# loads, evaluates or saves); the progress ConfigMap is patched at most this often.
PROGRESS_REPORT_INTERVAL_SECONDS = 10
# spec.restartPolicy.progressDeadlineSeconds must span a few reports: one late report is not a stall.
MIN_PROGRESS_DEADLINE_SECONDS = 3 * PROGRESS_REPORT_INTERVAL_SECONDS


class Activity:
    """What the trainer is doing when it reports: outside training, a report is liveness, not progress."""

    LOADING = "loading"  # fetching or loading the model and data
    TRAINING = "training"  # only a new step is progress
    EVALUATING = "evaluating"
    SAVING = "saving"  # the final adapter, merged model, metrics


def utc_timestamp(moment: datetime | None = None) -> str:
    """RFC 3339, seconds, UTC: how both sides write times."""
    return (moment or datetime.now(timezone.utc)).strftime("%Y-%m-%dT%H:%M:%SZ")


class InPlaceRestart(BaseModel):
    """One restart of the gang's processes inside its pods, as the elastic agents saw it (InPlace strategy)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    index: int = Field(ge=1, description="1 for the gang attempt's first in-place restart, 2 for its second, ...")
    time: str = Field(default_factory=utc_timestamp, description="When the failure was seen (RFC 3339).")
    pod: str | None = Field(default=None, description="The pod whose training process failed.")
    rank: int | None = Field(default=None, description="The failed process's global rank.")
    exit_code: int | None = Field(
        default=None, description="Its exit code as a container runtime reports it (128 + N: killed by signal N)."
    )
    message: str | None = Field(default=None, description="Its termination message, shortened.")


class ProgressReport(BaseModel):
    """Rank 0's progress: progress.json, the progress ConfigMap, and what the operator copies into the status."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    step: int = Field(default=0, ge=0, description="Optimizer steps done.")
    total_steps: int | None = Field(default=None, description="Optimizer steps the run will take.")
    epoch: float | None = Field(default=None, description="Epochs done, fractional.")
    loss: float | None = Field(default=None, description="Recent training loss.")
    tokens_per_second: float | None = Field(default=None, description="Training throughput, all workers.")
    eta_seconds: int | None = Field(default=None, description="Estimated seconds to completion.")
    eval_loss: float | None = Field(default=None, description="Loss on the eval set at the latest evaluation.")
    eval_accuracy: float | None = Field(default=None, description="Accuracy on the eval set (classification).")
    best_step: int | None = Field(default=None, description="Step of the best evaluation (checkpoint.keepBest).")
    last_checkpoint_step: int | None = Field(default=None, description="Step of the newest complete checkpoint.")
    last_checkpoint_time: str | None = Field(default=None, description="When it was written (RFC 3339).")
    activity: str | None = Field(
        default=None,
        description="loading, training, evaluating or saving (Activity); none reads as training. The progress "
        "deadline counts a new step as progress while training, and any new report in the other activities.",
    )
    time: str = Field(default_factory=utc_timestamp, description="When this report was made (RFC 3339).")
    attempt: int | None = Field(default=None, description="The gang attempt that made it ($FINETUNE_ATTEMPT).")
    in_place_restarts: list[InPlaceRestart] = Field(
        default_factory=list,
        description="The gang attempt's in-place restarts so far, oldest first (the operator counts each once).",
    )

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True)

    @classmethod
    def from_json(cls, raw: str | bytes | None) -> ProgressReport | None:
        """The report, or None when there is none or it cannot be read (a report never fails a job)."""
        if not raw:
            return None
        try:
            return cls.model_validate_json(raw)
        except ValueError:
            return None
