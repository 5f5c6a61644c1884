"""Operator settings, read from FINETUNE_OPERATOR_* env (the Helm chart sets them from values.yaml)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FINETUNE_OPERATOR_", frozen=True)

    trainer_image: str = Field(
        default="ghcr.io/finetune-operator/trainer:0.1.0",
        description="Image for worker pods whose FineTuneJob sets no spec.image.",
    )
    image_pull_policy: str = Field(default="IfNotPresent", description="imagePullPolicy of worker pods.")
    watch_namespaces: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Namespaces to watch, comma-separated; empty watches the whole cluster.",
    )
    termination_grace_period_seconds: int = Field(
        default=60,
        ge=1,
        description="Grace period of worker pods: the trainer checkpoints on SIGTERM within it.",
    )
    log_level: str = Field(default="INFO", description="Operator log level.")
    metrics_port: int = Field(default=8080, description="Port of the Prometheus /metrics endpoint; 0 disables.")
    health_port: int = Field(default=8081, description="Port of the liveness endpoint /healthz; 0 disables.")
    peering: str | None = Field(
        default=None,
        description="kopf peering name: with several replicas only one reconciles; unset runs standalone.",
    )

    @field_validator("watch_namespaces", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value
