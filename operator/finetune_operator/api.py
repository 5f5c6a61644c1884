"""The FineTuneJob API (finetune.dev/v1alpha1) as pydantic models: the one source of the CRD schema.

The training fields come from finetune_trainer.config so the trainer reads exactly what the API accepts.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Any

from pydantic import Field, field_validator, model_validator

from finetune_trainer.config import SpecModel, TrainerConfig, TrainingJobFields
from finetune_trainer.contract import (
    MIN_PROGRESS_DEADLINE_SECONDS,
    PROGRESS_REPORT_INTERVAL_SECONDS,
    RESERVED_ENV,
    RestartStrategy,
)

GROUP = "finetune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ["ftj"]
# The trainer's container in every worker pod: a worker's outcome is this container's, whatever sidecars do.
TRAINER_CONTAINER = "trainer"
CAPABILITY = re.compile(r"^[A-Z][A-Z0-9_]*$")
MAX_PROGRESS_DEADLINE_SECONDS = 7 * 24 * 3600  # a week: anything longer is a typo, not a deadline


class PersistentVolumeClaimSource(SpecModel):
    claim_name: str = Field(min_length=1, description="Name of a PersistentVolumeClaim in the job's namespace.")


class EmptyDirSource(SpecModel):
    size_limit: str | None = Field(
        default=None,
        description="`storage.emptyDir: {}` runs without a claim (outputs and checkpoints vanish with the pods); "
        "this caps the folder on worker-0's node (a quantity, e.g. 20Gi); default: no cap.",
    )


class ModelCacheSpec(SpecModel):
    persistent_volume_claim: PersistentVolumeClaimSource | None = Field(
        default=None,
        description="Claim for HF_HOME that keeps downloaded base models across gang restarts; every worker "
        "mounts it, so with workers on several nodes it must be ReadWriteMany.",
    )
    size_limit: str | None = Field(
        default=None,
        description="Without a claim: size of the node-local cache (an emptyDir), also requested as "
        "ephemeral-storage; default: the operator's modelCacheSize (chart trainer.modelCacheSize, empty: no "
        "size, no request).",
    )

    @model_validator(mode="after")
    def _claim_or_size(self) -> ModelCacheSpec:
        if self.persistent_volume_claim is not None and self.size_limit is not None:
            raise ValueError("set persistentVolumeClaim or sizeLimit, not both: a claim has its own size")
        return self


class StorageSpec(SpecModel):
    """Exactly one of persistentVolumeClaim and emptyDir: running without a claim is a choice a job states."""

    persistent_volume_claim: PersistentVolumeClaimSource | None = Field(
        default=None,
        description="Claim that holds checkpoints and outputs. Only worker-0 mounts it, so ReadWriteOnce works "
        "with workers on several nodes.",
    )
    empty_dir: EmptyDirSource | None = Field(
        default=None,
        description="No claim: outputs and checkpoints live in an emptyDir on worker-0's node and vanish with "
        "the pods (a gang restart starts from step 0). `{}` states the choice.",
    )
    sub_path: str | None = Field(
        default=None,
        description="Folder inside the claim for this job's run; default: the job's name.",
    )
    model_cache: ModelCacheSpec | None = Field(
        default=None,
        description="Where HF_HOME lives; default: a node-local emptyDir of the operator's modelCacheSize.",
    )

    @model_validator(mode="after")
    def _one_choice(self) -> StorageSpec:
        if (self.persistent_volume_claim is None) == (self.empty_dir is None):
            raise ValueError(
                "set exactly one of persistentVolumeClaim (outputs and checkpoints kept) and emptyDir: {} "
                "(they vanish with the pods)"
            )
        return self


class RestartStrategyName(str, Enum):
    in_place = RestartStrategy.IN_PLACE
    recreate = RestartStrategy.RECREATE


class RestartPolicySpec(SpecModel):
    strategy: RestartStrategyName = Field(
        default=RestartStrategyName.in_place,
        description="InPlace: a training process that fails makes every pod's agent restart its processes, which "
        "resume from the newest checkpoint; pods, nodes, volumes, pulled images and the queue's admission stay. "
        "Pods are made again only when a pod is lost or an agent runs out of restarts. Recreate: every failure "
        "deletes the gang's pods and makes new ones. Both spend maxRestarts and follow the backoff. A "
        "spec.command job restarts by recreation (its command replaces the agent).",
    )
    max_restarts: int = Field(default=3, ge=0, description="Gang restarts allowed before the job fails.")
    backoff_seconds: int = Field(
        default=10, ge=0, description="Wait before the first restart; doubles with each restart."
    )
    max_backoff_seconds: int = Field(default=300, ge=0, description="Upper bound of the growing backoff.")
    progress_deadline_seconds: int = Field(
        default=1800,
        ge=0,
        le=MAX_PROGRESS_DEADLINE_SECONDS,
        description="Restart the gang (reason Stalled, spending a restart) when the running gang's training step "
        "has not advanced for this long; loading, evaluating and saving report liveness instead. 0 turns it off; "
        f"else at least {MIN_PROGRESS_DEADLINE_SECONDS} (the trainer reports every "
        f"{PROGRESS_REPORT_INTERVAL_SECONDS} s at most). A spec.command script gets it once it reports progress.",
    )
    max_disruptions: int = Field(
        default=20,
        ge=0,
        description="Gang restarts after disruptions (preemption, eviction, a lost node) allowed before the job "
        "fails; they never spend maxRestarts.",
    )
    max_startup_retries: int = Field(
        default=5,
        ge=0,
        description="Gangs made again because they did not start within startupTimeoutSeconds, before the job "
        "fails naming what blocked it.",
    )

    @field_validator("progress_deadline_seconds")
    @classmethod
    def _spans_reports(cls, seconds: int) -> int:
        if 0 < seconds < MIN_PROGRESS_DEADLINE_SECONDS:
            raise ValueError(
                f"progressDeadlineSeconds={seconds} is shorter than the time between progress reports allows: the "
                f"trainer reports every {PROGRESS_REPORT_INTERVAL_SECONDS} s at most, so the deadline must be 0 "
                f"(off) or at least {MIN_PROGRESS_DEADLINE_SECONDS} s"
            )
        return seconds


class EnvVar(SpecModel):
    name: str = Field(min_length=1, description="Variable name.")
    value: str | None = Field(default=None, description="Literal value.")
    value_from: dict[str, Any] | None = Field(
        default=None, description="A Kubernetes EnvVarSource (secretKeyRef, configMapKeyRef, fieldRef, ...)."
    )


class LocalObjectReference(SpecModel):
    name: str = Field(min_length=1, description="Name of an object in the job's namespace.")


class PodTemplateOverrides(SpecModel):
    labels: dict[str, str] | None = Field(default=None, description="Extra labels on worker pods.")
    annotations: dict[str, str] | None = Field(default=None, description="Extra annotations on worker pods.")
    node_selector: dict[str, str] | None = Field(default=None, description="Pod nodeSelector.")
    tolerations: list[dict[str, Any]] | None = Field(default=None, description="Pod tolerations.")
    affinity: dict[str, Any] | None = Field(default=None, description="Pod affinity.")
    priority_class_name: str | None = Field(default=None, description="Pod priorityClassName.")
    scheduler_name: str | None = Field(default=None, description="Pod schedulerName (e.g. a gang scheduler).")
    service_account_name: str | None = Field(
        default=None, description="ServiceAccount of the workers; default: the operator's trainer account."
    )
    env: list[EnvVar] | None = Field(default=None, description="Extra env for the trainer container.")
    env_from: list[dict[str, Any]] | None = Field(
        default=None, description="envFrom sources (configMapRef, secretRef) for the trainer container."
    )
    resources: dict[str, Any] | None = Field(
        default=None,
        description="Trainer container resources; nvidia.com/gpu comes from gpusPerWorker. cpu and memory not set "
        "here default to the operator's per-GPU amounts (chart trainer.resources: cpu 4, memory 32Gi as request "
        "and limit, per GPU or per CPU worker).",
    )
    volumes: list[dict[str, Any]] | None = Field(default=None, description="Extra pod volumes.")
    volume_mounts: list[dict[str, Any]] | None = Field(
        default=None, description="Extra volumeMounts for the trainer container."
    )
    image_pull_secrets: list[LocalObjectReference] | None = Field(
        default=None,
        description="Secrets for pulling the images, added to the operator's imagePullSecrets (chart "
        "trainer.imagePullSecrets, none by default).",
    )
    topology_spread_constraints: list[dict[str, Any]] | None = Field(
        default=None, description="Pod topologySpreadConstraints, e.g. one worker per node or per rack."
    )
    runtime_class_name: str | None = Field(
        default=None, description="Pod runtimeClassName, e.g. nvidia where the GPU runtime is not the default."
    )
    init_containers: list[dict[str, Any]] | None = Field(
        default=None,
        description="Containers run to completion before the trainer; the worker pods' security defaults "
        "apply where they set none.",
    )
    sidecars: list[dict[str, Any]] | None = Field(
        default=None,
        description="Containers beside the trainer (log shippers, proxies); a worker's outcome is its trainer's, "
        "so one that never exits does not hold the job. Security defaults apply where they set none.",
    )
    capabilities: list[str] | None = Field(
        default=None,
        description="Linux capabilities added to the trainer container (e.g. IPC_LOCK for RDMA); all others "
        "stay dropped.",
    )

    @field_validator("env")
    @classmethod
    def _no_reserved_env(cls, env: list[EnvVar] | None) -> list[EnvVar] | None:
        for var in env or []:
            if var.name in RESERVED_ENV:
                raise ValueError(f"{var.name} is set by the operator for the DDP wiring and cannot be overridden")
        return env

    @field_validator("capabilities")
    @classmethod
    def _named_capabilities(cls, capabilities: list[str] | None) -> list[str] | None:
        for name in capabilities or []:
            if not CAPABILITY.match(name) or name == "ALL":
                raise ValueError(f"{name!r} is not one capability name such as IPC_LOCK (ALL is refused)")
        return capabilities

    @field_validator("init_containers", "sidecars")
    @classmethod
    def _named_containers(cls, containers: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        for container in containers or []:
            name = container.get("name")
            if not isinstance(name, str) or not name:
                raise ValueError("every container needs a name")
            if name == TRAINER_CONTAINER:
                raise ValueError(f"the name {TRAINER_CONTAINER!r} belongs to the operator's trainer container")
        return containers


class GangSchedulingSpec(SpecModel):
    scheduler_name: str | None = Field(
        default=None,
        description="`gangScheduling: {}` turns gang scheduling on. The scheduler that honours the PodGroup; "
        "default: the operator's gangSchedulerName (chart gangScheduling.schedulerName, "
        "scheduler-plugins-scheduler).",
    )
    schedule_timeout_seconds: int | None = Field(
        default=None, ge=1, description="PodGroup scheduleTimeoutSeconds: how long a gang may wait whole."
    )


def _storage_is_a_choice(schema: dict[str, Any]) -> None:
    """The CRD requires spec.storage, so that running without a claim is a choice a job states; in-process
    callers (`finetune local`, where --output-dir is the storage, and tests) get emptyDir when they omit it."""
    schema["properties"]["storage"].pop("default", None)
    schema.setdefault("required", []).append("storage")


class FineTuneJobSpec(TrainingJobFields):
    """What to fine-tune, on how many workers, and how to survive failures."""

    model_config = TrainingJobFields.model_config | {"json_schema_extra": _storage_is_a_choice}

    workers: int = Field(default=1, ge=1, description="Worker pods in the gang.")
    gpus_per_worker: int = Field(
        default=1, ge=0, description="nvidia.com/gpu per pod = processes per pod (0: CPU, one process)."
    )
    storage: StorageSpec = Field(
        default_factory=lambda: StorageSpec(empty_dir=EmptyDirSource()),
        description="Required: where checkpoints and outputs live, a claim or emptyDir: {} to run without one.",
    )
    restart_policy: RestartPolicySpec = Field(
        default_factory=RestartPolicySpec, description="Gang restarts on retryable failures."
    )
    image: str | None = Field(
        default=None,
        min_length=1,
        description="Trainer image; default from the operator's settings. An empty string is refused (a "
        "templated value that came out empty), not read as unset.",
    )
    command: list[str] | None = Field(
        default=None, description="Bring your own training script; it gets the same torchrun-style env."
    )
    suspend: bool = Field(default=False, description="Delete the gang and keep the job; clear to resume.")
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, description="Fail the job when it has run this long since it started."
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None, ge=0, description="Delete the job this long after it succeeded or failed."
    )
    startup_timeout_seconds: int = Field(
        default=300,
        ge=1,
        description="A gang whose workers are not all running this long after they were created (while some "
        "hold a node) is deleted and made again, without spending restarts. Below the trainer's 600 s "
        "rendezvous timeout, so a half-scheduled gang is retried before rank 0 gives up.",
    )
    template: PodTemplateOverrides = Field(
        default_factory=PodTemplateOverrides, description="Overrides for the worker pods."
    )
    gang_scheduling: GangSchedulingSpec | None = Field(
        default=None,
        description="Set (`{}` for the defaults) to create a scheduler-plugins PodGroup with minMember = workers "
        "and schedule the workers with a gang scheduler: none starts until all fit.",
    )

    @property
    def processes_per_worker(self) -> int:
        return max(self.gpus_per_worker, 1)

    @property
    def world_size(self) -> int:
        return self.workers * self.processes_per_worker

    def trainer_config(self, output_dir: str) -> TrainerConfig:
        shared = self.model_dump(include=set(TrainingJobFields.model_fields))
        return TrainerConfig(**shared, output_dir=output_dir)


# The fields a live job may change (the spec-edit policy); an edit to any other field is refused.
MUTABLE_SPEC_FIELDS = frozenset(
    {"suspend", "restartPolicy", "activeDeadlineSeconds", "ttlSecondsAfterFinished", "startupTimeoutSeconds"}
)


class Phase(str, Enum):
    pending = "Pending"
    queued = "Queued"
    running = "Running"
    restarting = "Restarting"
    succeeded = "Succeeded"
    failed = "Failed"
    suspended = "Suspended"


FINISHED_PHASES = frozenset({Phase.succeeded.value, Phase.failed.value})


class Condition(SpecModel):
    type: str = Field(
        description="Created, Queued, Running, Restarting, Suspended, Succeeded, Failed; Ready (True while the "
        "gang runs or the job succeeded, for health checks); Blocked (why the gang cannot start or finish "
        "stopping) and EditRefused (a spec edit the operator does not act on)."
    )
    status: str = Field(description="True, False or Unknown.")
    reason: str = Field(description="CamelCase reason, stable for automation.")
    message: str = Field(description="What happened, for people.")
    last_transition_time: str = Field(description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(default=None, description="The spec generation the condition is for.")


class WorkersStatus(SpecModel):
    ready: int = Field(default=0, description="Worker pods running and ready.")
    total: int = Field(default=0, description="Worker pods in the gang.")
    summary: str = Field(default="0/0", description="ready/total, for the Workers column.")


class Progress(SpecModel):
    step: int = Field(default=0, description="Optimizer steps done.")
    total_steps: int | None = Field(default=None, description="Optimizer steps the run will take.")
    loss: float | None = Field(default=None, description="Recent training loss.")
    tokens_per_second: float | None = Field(default=None, description="Training throughput, all workers.")
    eta_seconds: int | None = Field(default=None, description="Estimated seconds to completion.")
    eval_loss: float | None = Field(default=None, description="Loss on the eval set at the latest evaluation.")
    eval_accuracy: float | None = Field(default=None, description="Accuracy on the eval set (classification).")
    updated: str | None = Field(default=None, description="When the trainer reported this (RFC 3339).")
    activity: str | None = Field(default=None, description="loading, training, evaluating or saving.")
    advanced: str | None = Field(
        default=None,
        description="When the operator last saw progress: a new step, or liveness while loading, evaluating or "
        "saving (RFC 3339); restartPolicy.progressDeadlineSeconds counts from here.",
    )


class OutputsStatus(SpecModel):
    """Where the run's adapter lands: a folder inside a claim, or worker-0's emptyDir."""

    claim_name: str | None = Field(default=None, description="The claim holding the outputs (none: an emptyDir).")
    sub_path: str | None = Field(default=None, description="The run's folder inside the claim.")
    adapter: str = Field(description="The adapter (peft save_pretrained), relative to the claim's root.")
    best_adapter: str | None = Field(default=None, description="checkpoint.keepBest's adapter, when on.")
    best_step: int | None = Field(default=None, description="The step the best adapter comes from.")


class CheckpointStatus(SpecModel):
    step: int = Field(description="Step of the newest complete checkpoint.")
    time: str | None = Field(default=None, description="When it was written (RFC 3339).")


class RestartRecord(SpecModel):
    time: str = Field(description="When the failure was seen (RFC 3339).")
    attempt: int = Field(description="The attempt that failed.")
    kind: str = Field(
        default="Crash",
        description="Crash (spent a restart, the gang was made again), InPlace (spent a restart, the pods' "
        "processes restarted in place), Stall (no progress, spent a restart) or Disruption (preempted, evicted, "
        "node lost: counted in disruptions, not restarts).",
    )
    reason: str = Field(description="Why: Error, OOMKilled, Stalled, Deleted, PreemptionByScheduler, ...")
    exit_code: int | None = Field(default=None, description="Exit code of the failed worker, if it exited.")
    pod: str = Field(description="The worker pod that failed (an InPlace restart's log is in that pod's log).")
    node: str | None = Field(default=None, description="The node it ran on.")
    message: str | None = Field(default=None, description="Termination message or status message, shortened.")
    index: int | None = Field(default=None, description="An InPlace restart's number within its attempt (1, 2, ...).")
    step_reached: int | None = Field(default=None, description="Training step reached before the failure.")
    resumed_from_step: int | None = Field(default=None, description="Checkpoint step the next attempt resumes from.")
    gpu_seconds_lost: int = Field(
        default=0, description="GPU time thrown away: since the newest checkpoint (or the attempt's start) x GPUs."
    )


class FineTuneJobStatus(SpecModel):
    phase: Phase | None = Field(default=None, description="The job's current state.")
    reason: str | None = Field(
        default=None, description="Why the job waits or failed (Unschedulable, ErrImagePull, ...); the Reason column."
    )
    conditions: list[Condition] = Field(default_factory=list, description="Kubernetes-style conditions.")
    workers: WorkersStatus | None = Field(default=None, description="Ready and total worker pods.")
    attempt: int = Field(default=0, description="Current gang attempt (0 first, +1 per restart).")
    restarts: int = Field(default=0, description="Gang restarts after failures so far (maxRestarts bounds them).")
    disruptions: int = Field(
        default=0, description="Gang restarts after disruptions (preemption, eviction, lost node); maxDisruptions."
    )
    restart_after: str | None = Field(default=None, description="The next attempt starts after this time.")
    restart_history: list[RestartRecord] = Field(default_factory=list, description="The last 10 restarts.")
    steps_lost: int = Field(default=0, description="Training steps redone because of failures.")
    gpu_seconds_lost: int = Field(default=0, description="GPU-seconds thrown away by failures, all restarts.")
    progress: Progress | None = Field(default=None, description="Training progress reported by rank 0.")
    last_checkpoint: CheckpointStatus | None = Field(default=None, description="Newest complete checkpoint.")
    outputs: OutputsStatus | None = Field(default=None, description="Where the adapter is (and the best one).")
    startup_retries: int = Field(
        default=0, description="Gangs made again because they did not start in time (not counted in restarts)."
    )
    attempt_start_time: str | None = Field(default=None, description="When the current attempt's gang was created.")
    accepted_spec: dict[str, Any] | None = Field(
        default=None,
        description="Only while a spec edit is refused: the spec the operator acts on instead, the last one it "
        "accepted (see the spec-edit policy).",
    )
    start_time: str | None = Field(
        default=None, description="When the job's gang was first created; reset when a suspended job resumes."
    )
    completion_time: str | None = Field(default=None, description="When the job succeeded or failed.")
    observed_generation: int | None = Field(default=None, description="The spec generation last acted on.")


class FineTuneJob(SpecModel):
    """Only what the operator reads of the object; the API server owns the rest."""

    model_config = SpecModel.model_config | {"extra": "ignore"}

    metadata: dict[str, Any] = Field(description="Object metadata.")
    spec: FineTuneJobSpec = Field(description="Desired state.")
    status: FineTuneJobStatus = Field(default_factory=FineTuneJobStatus, description="Observed state.")

    @property
    def name(self) -> str:
        return self.metadata["name"]

    @property
    def namespace(self) -> str:
        return self.metadata["namespace"]

    @property
    def uid(self) -> str:
        return self.metadata["uid"]
