"""Pure builders of the objects the operator owns for a FineTuneJob: dicts in, dicts out, no I/O.

The torchrun-style env wiring lives in exactly one place, `torchrun_env`, which `finetune local` reuses.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from finetune_operator.api import API_VERSION, KIND, FineTuneJob, FineTuneJobSpec
from finetune_operator.config import OperatorSettings
from finetune_trainer.contract import ATTEMPT_ENV, CONFIG_ENV, JOB_NAME_ENV, NAMESPACE_ENV, PROGRESS_CONFIG_MAP_ENV

WORKER_NAME = "{job}-worker-{rank}"
CONFIG_MAP_NAME = "{job}-config"
PROGRESS_CONFIG_MAP_NAME = "{job}-progress"
TRAINER_ACCOUNT_NAME = "{job}-trainer"
SERVICE_NAME = "{job}"

MASTER_PORT = 29500  # torchrun's default
CONFIG_MOUNT_PATH = "/etc/finetune"
CONFIG_FILE = "config.yaml"
OUTPUT_MOUNT_PATH = "/mnt/finetune/output"
TRAINER_CONTAINER = "trainer"
DEFAULT_COMMAND = ["finetune", "train", "--config", f"{CONFIG_MOUNT_PATH}/{CONFIG_FILE}"]

LABEL_JOB = "finetune.dev/job"
LABEL_RANK = "finetune.dev/rank"
LABEL_ATTEMPT = "finetune.dev/attempt"
LABEL_ROLE = "finetune.dev/role"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "finetune-operator"

DNS_LABEL_MAX = 63
DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# The progress ConfigMap's name is the longest non-worker name derived from the job's.
LONGEST_OTHER_SUFFIX = len(PROGRESS_CONFIG_MAP_NAME.format(job=""))


class SpecProblem(ValueError):
    """A spec the API server accepted but the operator cannot run; the message names the field."""


def max_job_name_length(workers: int) -> int:
    """Longest job name whose worker hostnames (`<job>-worker-<rank>`) are still valid DNS labels."""
    longest_worker_suffix = len(WORKER_NAME.format(job="", rank=workers - 1))
    return DNS_LABEL_MAX - max(longest_worker_suffix, LONGEST_OTHER_SUFFIX)


def check_runnable(job: FineTuneJob) -> None:
    """Refuse what the CRD schema cannot express, naming the field."""
    longest = max_job_name_length(job.spec.workers)
    if not DNS_1035_LABEL.match(job.name):
        raise SpecProblem(
            f"metadata.name {job.name!r} must be a DNS-1035 label (lower case letters, digits and '-', "
            "starting with a letter): it names the headless Service"
        )
    if len(job.name) > longest:
        raise SpecProblem(
            f"metadata.name {job.name!r} is {len(job.name)} characters; with spec.workers={job.spec.workers} "
            f"at most {longest} keep the worker hostnames within 63 characters"
        )


def job_labels(job_name: str) -> dict[str, str]:
    return {LABEL_JOB: job_name, LABEL_MANAGED_BY: MANAGED_BY}


def worker_labels(job_name: str, rank: int, attempt: int) -> dict[str, str]:
    return {**job_labels(job_name), LABEL_ROLE: "worker", LABEL_RANK: str(rank), LABEL_ATTEMPT: str(attempt)}


def owner_reference(job: FineTuneJob) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": job.name,
        "uid": job.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(job: FineTuneJob, name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": job.namespace,
        "labels": labels,
        "ownerReferences": [owner_reference(job)],
    }


def master_address(job_name: str, namespace: str) -> str:
    """Rank 0's stable DNS name through the headless Service."""
    return f"{WORKER_NAME.format(job=job_name, rank=0)}.{SERVICE_NAME.format(job=job_name)}.{namespace}.svc"


def torchrun_env(spec: FineTuneJobSpec, node_rank: int, master_addr: str) -> dict[str, str]:
    """The DDP wiring for one worker, as torchrun and Kubeflow's PyTorchJob name it."""
    nproc = spec.processes_per_worker
    env = {
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(MASTER_PORT),
        "WORLD_SIZE": str(spec.world_size),
        "NNODES": str(spec.workers),
        "NODE_RANK": str(node_rank),
        "NPROC_PER_NODE": str(nproc),
        "PET_NNODES": str(spec.workers),
        "PET_NPROC_PER_NODE": str(nproc),
        "PET_NODE_RANK": str(node_rank),
        "PET_MASTER_ADDR": master_addr,
        "PET_MASTER_PORT": str(MASTER_PORT),
        "PYTHONUNBUFFERED": "1",
    }
    if nproc == 1:
        env["RANK"] = str(node_rank)
    return env


def trainer_config_yaml(spec: FineTuneJobSpec, output_dir: str = OUTPUT_MOUNT_PATH) -> str:
    config = spec.trainer_config(output_dir=output_dir)
    return yaml.safe_dump(config.model_dump(mode="json", by_alias=True, exclude_none=True), sort_keys=False)


def build_trainer_config_map(job: FineTuneJob) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, CONFIG_MAP_NAME.format(job=job.name), job_labels(job.name)),
        "data": {CONFIG_FILE: trainer_config_yaml(job.spec)},
    }


def build_headless_service(job: FineTuneJob) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, SERVICE_NAME.format(job=job.name), job_labels(job.name)),
        "spec": {
            "clusterIP": "None",
            "selector": {LABEL_JOB: job.name, LABEL_ROLE: "worker"},
            # Workers must resolve rank 0 before it is Ready: rendezvous is what makes it ready.
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rendezvous", "port": MASTER_PORT, "targetPort": MASTER_PORT}],
        },
    }


def _storage_volume(spec: FineTuneJobSpec) -> dict[str, Any]:
    claim = spec.storage.persistent_volume_claim
    if claim is None:
        return {"name": "output", "emptyDir": {}}
    return {"name": "output", "persistentVolumeClaim": {"claimName": claim.claim_name}}


def _resources(spec: FineTuneJobSpec) -> dict[str, Any]:
    # Quantities are strings in the Pod API ("8", "64Gi"); YAML may have given numbers.
    resources = {
        kind: {name: str(q) for name, q in amounts.items()} for kind, amounts in (spec.template.resources or {}).items()
    }
    if spec.gpus_per_worker > 0:
        for kind in ("requests", "limits"):
            resources.setdefault(kind, {})["nvidia.com/gpu"] = str(spec.gpus_per_worker)
    return resources


SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
SERVICE_ACCOUNT_TOKEN_VOLUME = {
    "name": "service-account-token",
    "projected": {
        "sources": [
            {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}},
        ]
    },
}

CONTAINER_SECURITY_CONTEXT = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}
POD_SECURITY_CONTEXT = {
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "runAsGroup": 1000,
    "fsGroup": 1000,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def build_worker_pod(job: FineTuneJob, rank: int, attempt: int, settings: OperatorSettings) -> dict[str, Any]:
    spec = job.spec
    name = WORKER_NAME.format(job=job.name, rank=rank)
    wiring = torchrun_env(spec, rank, master_address(job.name, job.namespace))
    wiring |= {
        JOB_NAME_ENV: job.name,
        ATTEMPT_ENV: str(attempt),
        CONFIG_ENV: f"{CONFIG_MOUNT_PATH}/{CONFIG_FILE}",
        NAMESPACE_ENV: job.namespace,
        PROGRESS_CONFIG_MAP_ENV: PROGRESS_CONFIG_MAP_NAME.format(job=job.name),
    }
    # Read-only root filesystem: the caches a trainer writes go to the scratch volume.
    scratch_env = {"HOME": "/tmp", "HF_HOME": "/tmp/huggingface", "TRITON_CACHE_DIR": "/tmp/triton"}
    env = [{"name": k, "value": v} for k, v in (scratch_env | wiring).items()]
    env += [var.model_dump(by_alias=True, exclude_none=True) for var in spec.template.env or []]
    template = spec.template
    sub_path = spec.storage.sub_path or job.name if spec.storage.persistent_volume_claim else None
    container = {
        "name": TRAINER_CONTAINER,
        "image": spec.image or settings.trainer_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": spec.command or DEFAULT_COMMAND,
        "env": env,
        "envFrom": template.env_from or [],
        "resources": _resources(spec),
        "ports": [{"name": "rendezvous", "containerPort": MASTER_PORT}],
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_MOUNT_PATH, "readOnly": True},
            {"name": "output", "mountPath": OUTPUT_MOUNT_PATH, **({"subPath": sub_path} if sub_path else {})},
            {"name": "scratch", "mountPath": "/tmp"},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "service-account-token", "mountPath": SERVICE_ACCOUNT_DIR, "readOnly": True},
            *(template.volume_mounts or []),
        ],
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": CONTAINER_SECURITY_CONTEXT,
    }
    pod_spec = {
        "hostname": name,
        "subdomain": SERVICE_NAME.format(job=job.name),
        "restartPolicy": "Never",  # the operator restarts the whole gang, never one worker
        "serviceAccountName": template.service_account_name or TRAINER_ACCOUNT_NAME.format(job=job.name),
        # The token comes from the projected volume below, as Kubernetes >= 1.21 mounts it by itself. Before
        # 1.24 automounting would wait for the token controller to make a Secret for each new per-job account.
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": settings.termination_grace_period_seconds,
        "securityContext": POD_SECURITY_CONTEXT,
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": CONFIG_MAP_NAME.format(job=job.name)}},
            _storage_volume(spec),
            {"name": "scratch", "emptyDir": {}},
            # NCCL and DataLoader workers need more shared memory than a container's 64 MiB default.
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
            SERVICE_ACCOUNT_TOKEN_VOLUME,
            *(template.volumes or []),
        ],
    }
    optional = {
        "nodeSelector": template.node_selector,
        "tolerations": template.tolerations,
        "affinity": template.affinity,
        "priorityClassName": template.priority_class_name,
        "schedulerName": template.scheduler_name,
    }
    pod_spec |= {key: value for key, value in optional.items() if value}
    metadata = _metadata(job, name, {**(template.labels or {}), **worker_labels(job.name, rank, attempt)})
    if template.annotations:
        metadata["annotations"] = dict(template.annotations)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}


def build_gang(job: FineTuneJob, attempt: int, settings: OperatorSettings) -> list[dict[str, Any]]:
    return [build_worker_pod(job, rank, attempt, settings) for rank in range(job.spec.workers)]


def build_trainer_service_account(job: FineTuneJob) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(job, TRAINER_ACCOUNT_NAME.format(job=job.name), job_labels(job.name)),
    }


def build_progress_config_map(job: FineTuneJob) -> dict[str, Any]:
    """Where rank 0 reports progress: the one object the trainer may write."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, PROGRESS_CONFIG_MAP_NAME.format(job=job.name), job_labels(job.name)),
        "data": {},
    }


def build_progress_role(job: FineTuneJob) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _metadata(job, TRAINER_ACCOUNT_NAME.format(job=job.name), job_labels(job.name)),
        "rules": [
            {
                "apiGroups": [""],
                "resources": ["configmaps"],
                "resourceNames": [PROGRESS_CONFIG_MAP_NAME.format(job=job.name)],
                "verbs": ["get", "patch"],
            }
        ],
    }


def build_progress_role_binding(job: FineTuneJob) -> dict[str, Any]:
    account = job.spec.template.service_account_name or TRAINER_ACCOUNT_NAME.format(job=job.name)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _metadata(job, TRAINER_ACCOUNT_NAME.format(job=job.name), job_labels(job.name)),
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": TRAINER_ACCOUNT_NAME.format(job=job.name),
        },
        "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": job.namespace}],
    }


def build_job_resources(job: FineTuneJob) -> list[dict[str, Any]]:
    """Everything a job owns besides its worker pods, in creation order."""
    resources = [
        build_headless_service(job),
        build_trainer_config_map(job),
        build_progress_config_map(job),
        build_progress_role(job),
        build_progress_role_binding(job),
    ]
    if not job.spec.template.service_account_name:
        resources.insert(2, build_trainer_service_account(job))
    return resources
