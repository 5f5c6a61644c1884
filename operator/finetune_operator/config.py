"""Operator settings, read from FINETUNE_OPERATOR_* env (the Helm chart sets them from values.yaml)."""

from __future__ import annotations

import json
import re
from decimal import Decimal
from pathlib import Path
from typing import Annotated

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from finetune_operator.pod_defaults import PodDefaults

# A plain decimal quantity with an optional SI or binary suffix (no exponents): what scale_quantity handles.
QUANTITY = re.compile(r"^(?P<number>[0-9]+(\.[0-9]+)?)(?P<suffix>m|k|M|G|T|P|Ki|Mi|Gi|Ti|Pi)?$")


def scale_quantity(quantity: str, times: int) -> str:
    """`times` x a quantity, in the quantity's own unit: ("64Gi", 8) -> "512Gi", ("500m", 3) -> "1500m"."""
    match = QUANTITY.match(quantity)
    if match is None:
        raise ValueError(f"{quantity!r} is not a Kubernetes quantity such as 500m, 8 or 64Gi")
    number = Decimal(match["number"]) * times
    return f"{number.normalize():f}{match['suffix'] or ''}"


def cpu_cores(quantity: str) -> float | None:
    """A CPU quantity in cores ("500m" -> 0.5), or None when it is not a plain one."""
    match = QUANTITY.match(quantity)
    if match is None or match["suffix"] not in (None, "m"):
        return None
    return float(match["number"]) / (1000 if match["suffix"] == "m" else 1)


# Kubernetes' label selector syntax (`kubectl get -l`): requirements separated by commas outside parentheses,
# each `key`, `!key`, `key=value`, `key==value`, `key!=value`, `key in (a,b)` or `key notin (a,b)`.
_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
_LABEL_KEY = rf"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?{_LABEL_NAME}"
_LABEL_VALUE = rf"({_LABEL_NAME})?"
_REQUIREMENT = (
    rf"\s*(!\s*{_LABEL_KEY}|{_LABEL_KEY}(\s*(==?|!=)\s*{_LABEL_VALUE}"
    rf"|\s+(in|notin)\s*\(\s*{_LABEL_VALUE}(\s*,\s*{_LABEL_VALUE})*\s*\))?)\s*"
)
LABEL_REQUIREMENT = re.compile(rf"^{_REQUIREMENT}$")
# A whole selector, or none: the chart's values.schema.json has this pattern for watchNamespaceSelector (a test
# checks they agree), so that `helm install` refuses a bad one.
LABEL_SELECTOR = re.compile(rf"^({_REQUIREMENT}(,{_REQUIREMENT})*)?$")
_BETWEEN_REQUIREMENTS = re.compile(r",(?![^()]*\))")


def check_label_selector(selector: str) -> str:
    """`selector` when it is a label selector the API server takes, else a ValueError naming the bad part."""
    for requirement in _BETWEEN_REQUIREMENTS.split(selector):
        if not LABEL_REQUIREMENT.match(requirement):
            where = "" if requirement.strip() == selector.strip() else f" in {selector!r}"
            raise ValueError(
                f"{requirement.strip()!r}{where} is not a label selector requirement such as "
                "finetune.dev/tenant=true, team in (a,b) or !legacy"
            )
    return selector


SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def _own_namespace() -> str | None:
    """The namespace of the pod this runs in, as its mounted ServiceAccount token says; None outside a pod."""
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or None
    except OSError:
        return None


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FINETUNE_OPERATOR_", frozen=True)

    trainer_image: str = Field(
        default="ghcr.io/finetune-operator/trainer:0.1.0",
        description="Image for worker pods whose FineTuneJob sets no spec.image.",
    )
    image_pull_policy: str = Field(default="IfNotPresent", description="imagePullPolicy of worker pods.")
    watch_namespaces: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Namespaces to watch, comma-separated; empty (and no watch_namespace_selector) watches the whole "
        "cluster.",
    )
    watch_namespace_selector: str | None = Field(
        default=None,
        description="Serve the namespaces whose labels match this label selector (e.g. finetune.dev/tenant=true), "
        "each from when it matches (and the operator may list its jobs there) until it no longer does; exclusive "
        "with watch_namespaces.",
    )
    termination_grace_period_seconds: int = Field(
        default=60,
        ge=1,
        description="Grace period of worker pods: the trainer checkpoints on SIGTERM within it.",
    )
    image_pull_secrets: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Secrets (names, comma-separated) every worker pod pulls images with, besides the job's own "
        "spec.template.imagePullSecrets. Each must exist in the job's namespace.",
    )
    cpu_per_gpu: str | None = Field(
        default=None,
        description="CPU request per GPU (a CPU-only worker counts as one) of workers whose "
        "spec.template.resources.requests sets no cpu; unset: none. Also sets OMP_NUM_THREADS per process.",
    )
    memory_per_gpu: str | None = Field(
        default=None,
        description="Memory request and limit per GPU (a CPU-only worker counts as one) of workers whose "
        "spec.template.resources sets no memory; unset: none.",
    )
    shm_size: str = Field(default="16Gi", description="Size limit of the workers' /dev/shm (memory-backed).")
    tmp_size: str = Field(default="10Gi", description="Size limit of the workers' /tmp scratch volume.")
    model_cache_size: str | None = Field(
        default=None,
        description="Size of the node-local model cache (HF_HOME) of jobs with no spec.storage.modelCache claim: "
        "its emptyDir's limit and an ephemeral-storage request; unset: neither.",
    )
    pod_defaults: PodDefaults = Field(
        default_factory=PodDefaults,
        description="Tolerations, nodeSelector, affinity, priorityClassName, labels and annotations of every "
        "worker pod, under its job's own spec.template (JSON; the chart's trainer.podDefaults).",
    )
    gpu_toleration: bool = Field(
        default=True,
        description="Workers that request GPUs tolerate the nvidia.com/gpu taint (NoSchedule) unless they "
        "tolerate it already.",
    )
    trainer_metrics_port: int = Field(
        default=8000,
        ge=0,
        le=65535,
        description="Port of rank 0's Prometheus /metrics (step, loss, tokens/s) in every worker, the container "
        "port named metrics; 0 turns the trainer's endpoint off.",
    )
    gang_scheduler_name: str = Field(
        default="scheduler-plugins-scheduler",
        description="schedulerName of jobs with spec.gangScheduling that name none: the coscheduling scheduler.",
    )
    log_level: str = Field(default="INFO", description="Operator log level.")
    metrics_port: int = Field(default=8080, description="Port of the Prometheus /metrics endpoint; 0 disables.")
    health_port: int = Field(default=8081, description="Port of the liveness endpoint /healthz; 0 disables.")
    leader_election_lease: str | None = Field(
        default=None,
        description="Name of the coordination.k8s.io Lease that replicas elect their leader with: only the "
        "holder runs, the others wait to take over; unset runs without leader election.",
    )
    leader_election_namespace: str = Field(
        default_factory=lambda: _own_namespace() or "default",
        description="Namespace of that Lease; default: the pod's own (its ServiceAccount's), else `default`.",
    )

    @field_validator(
        "cpu_per_gpu",
        "memory_per_gpu",
        "model_cache_size",
        "leader_election_lease",
        "watch_namespace_selector",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return value or None  # the chart sets every variable: an empty one means "none"

    @field_validator("cpu_per_gpu", "memory_per_gpu", "shm_size", "tmp_size", "model_cache_size")
    @classmethod
    def _quantity(cls, value: str | None) -> str | None:
        if value is not None and not QUANTITY.match(value):
            raise ValueError(f"{value!r} is not a Kubernetes quantity such as 500m, 8 or 64Gi")
        return value

    @field_validator("watch_namespace_selector")
    @classmethod
    def _label_selector(cls, value: str | None) -> str | None:
        return None if value is None else check_label_selector(value)

    @model_validator(mode="after")
    def _one_way_to_choose_namespaces(self) -> OperatorSettings:
        if self.watch_namespaces and self.watch_namespace_selector:
            raise ValueError(
                "FINETUNE_OPERATOR_WATCH_NAMESPACES and FINETUNE_OPERATOR_WATCH_NAMESPACE_SELECTOR are both set: "
                "serve a list of namespaces or the namespaces with a label, not both"
            )
        return self

    @field_validator("watch_namespaces", "image_pull_secrets", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("pod_defaults", mode="before")
    @classmethod
    def _json(cls, value: object) -> object:
        return json.loads(value or "{}") if isinstance(value, str) else value  # as the env gives it, or passed on


def settings_error(error: ValidationError) -> str:
    """A settings error as one line per problem, each naming the environment variable at fault."""
    lines = []
    for problem in error.errors():
        message = problem["msg"].removeprefix("Value error, ")
        field = ".".join(str(part) for part in problem["loc"])
        lines.append(f"FINETUNE_OPERATOR_{field.upper()}: {message}" if field else message)
    return "\n".join(lines)
