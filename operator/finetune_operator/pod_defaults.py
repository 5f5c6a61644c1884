"""Platform defaults for worker pods (chart `trainer.podDefaults`), merged under each job's own template.

A platform team sets tolerations, node selection, a priority class, labels and annotations once for every
worker; a job's `spec.template` still wins field by field. GPU workers also tolerate the `nvidia.com/gpu`
taint that GPU node pools carry (EKS does not add the toleration by itself; GKE does).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from finetune_operator.api import PodTemplateOverrides
from finetune_trainer.config import SpecModel

GPU_RESOURCE = "nvidia.com/gpu"
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}


class PodDefaults(SpecModel):
    """What every worker pod gets unless its job's spec.template says otherwise."""

    tolerations: list[dict[str, Any]] = Field(
        default_factory=list, description="Added to the job's own tolerations (tolerations only ever permit)."
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Merged under the job's nodeSelector: the job's value of a key wins."
    )
    affinity: dict[str, Any] = Field(
        default_factory=dict,
        description="nodeAffinity, podAffinity, podAntiAffinity: each one the job sets replaces the default's.",
    )
    priority_class_name: str | None = Field(default=None, description="priorityClassName of jobs that set none.")
    labels: dict[str, str] = Field(default_factory=dict, description="Merged under the job's labels.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Merged under the job's annotations.")


def _tolerates_gpus(tolerations: list[dict[str, Any]]) -> bool:
    return any(
        t.get("key") == GPU_RESOURCE or (not t.get("key") and t.get("operator") == "Exists") for t in tolerations
    )


def merged_tolerations(
    own: list[dict[str, Any]], defaults: list[dict[str, Any]], *, gpus: int, gpu_toleration: bool
) -> list[dict[str, Any]]:
    """The job's tolerations, then the defaults it lacks, then the GPU taint's where a GPU worker lacks one."""
    tolerations = list(own) + [t for t in defaults if t not in own]
    if gpus > 0 and gpu_toleration and not _tolerates_gpus(tolerations):
        tolerations.append(dict(GPU_TOLERATION))
    return tolerations


def with_pod_defaults(
    template: PodTemplateOverrides, defaults: PodDefaults, *, gpus: int, gpu_toleration: bool
) -> PodTemplateOverrides:
    """`template` with `defaults` filled in underneath it: the job's own values win."""
    affinity = {**defaults.affinity, **(template.affinity or {})}
    return template.model_copy(
        update={
            "tolerations": merged_tolerations(
                template.tolerations or [], defaults.tolerations, gpus=gpus, gpu_toleration=gpu_toleration
            ),
            "node_selector": {**defaults.node_selector, **(template.node_selector or {})},
            "affinity": affinity,
            "priority_class_name": template.priority_class_name or defaults.priority_class_name,
            "labels": {**defaults.labels, **(template.labels or {})},
            "annotations": {**defaults.annotations, **(template.annotations or {})},
        }
    )
