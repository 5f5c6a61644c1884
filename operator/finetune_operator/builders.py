"""Pure builders of the objects the operator owns for a FineTuneJob: dicts in, dicts out, no I/O.

The torchrun-style env wiring lives in exactly one place, `torchrun_env`, which `finetune local` reuses.
"""

from __future__ import annotations

import json
import re
from typing import Any

import yaml

from finetune_operator.api import (
    API_VERSION,
    KIND,
    TRAINER_CONTAINER,
    FineTuneJob,
    FineTuneJobSpec,
    RestartStrategyName,
)
from finetune_operator.config import OperatorSettings, cpu_cores, scale_quantity
from finetune_operator.pod_defaults import with_pod_defaults
from finetune_trainer.contract import (
    ATTEMPT_ENV,
    COLLECTIVE_TIMEOUT_ENV,
    CONFIG_ENV,
    GPUS_PER_WORKER_ENV,
    JOB_NAME_ENV,
    MAX_IN_PLACE_RESTARTS_ENV,
    MAX_RESTART_BACKOFF_ENV,
    NAMESPACE_ENV,
    PROGRESS_CONFIG_MAP_ENV,
    RESTART_BACKOFF_ENV,
    RESTART_STRATEGY_ENV,
    RESTARTS_SPENT_ENV,
    RUN_ID_ENV,
    collective_timeout,
)
from finetune_trainer.prometheus import PORT_ENV as METRICS_PORT_ENV

WORKER_NAME = "{job}-worker-{rank}"
CONFIG_MAP_NAME = "{job}-config"
# On the trainer config ConfigMap: the spec the job acts on, the durable copy behind the spec-edit policy
# (status.acceptedSpec holds it only while an edit is refused). An annotation, so no file in the pods' mount.
ACCEPTED_SPEC_ANNOTATION = "finetune.dev/accepted-spec"
PROGRESS_CONFIG_MAP_NAME = "{job}-progress"
FAILURE_CONFIG_MAP_NAME = "{job}-failure"  # the last gang restart's failed workers' output
TRAINER_ACCOUNT_NAME = "{job}-trainer"
SERVICE_NAME = "{job}"

MASTER_PORT = 29500  # torchrun's default
METRICS_PORT_NAME = "metrics"  # rank 0's Prometheus endpoint: what the chart's PodMonitor scrapes
CONFIG_MOUNT_PATH = "/etc/finetune"
CONFIG_FILE = "config.yaml"
OUTPUT_MOUNT_PATH = "/mnt/finetune/output"
MODEL_CACHE_PATH = "/var/cache/huggingface"
SCRATCH_PATH = "/tmp"
SHM_PATH = "/dev/shm"
YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml's: the same text at a tenth of the CPU
DEFAULT_COMMAND = ["finetune", "train", "--config", f"{CONFIG_MOUNT_PATH}/{CONFIG_FILE}"]

LABEL_JOB = "finetune.dev/job"
LABEL_RANK = "finetune.dev/rank"
LABEL_ATTEMPT = "finetune.dev/attempt"
LABEL_ROLE = "finetune.dev/role"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "finetune-operator"
DEFAULT_CONTAINER_ANNOTATION = "kubectl.kubernetes.io/default-container"  # `kubectl logs` picks the trainer

# Kueue's plain pod groups: a job labelled with a queue becomes one Workload of all its workers.
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_POD_GROUP_LABEL = "kueue.x-k8s.io/pod-group-name"
KUEUE_POD_GROUP_COUNT_ANNOTATION = "kueue.x-k8s.io/pod-group-total-count"
KUEUE_RETRIABLE_ANNOTATION = "kueue.x-k8s.io/retriable-in-group"
KUEUE_POD_GROUP_NAME = "{job}-{attempt}"  # one Workload per gang attempt
# scheduler-plugins' coscheduling: a PodGroup and the label that puts a pod in it.
POD_GROUP_API_VERSION = "scheduling.x-k8s.io/v1alpha1"
POD_GROUP_LABEL = "scheduling.x-k8s.io/pod-group"
POD_GROUP_NAME = "{job}"

# Above the usual host ranges (login users from 1000, systemd's dynamic users up to 65519): a uid that a
# container escaping to the host would share with no host user. The trainer image's user has it too.
WORKER_UID = 65532

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
    _check_template(job.spec)


def _check_template(spec: FineTuneJobSpec) -> None:
    """The operator's wiring stays the operator's: the job's template may add to the pod, never take over."""
    template = spec.template
    for index, volume in enumerate(template.volumes or []):
        if volume.get("name") in OPERATOR_MOUNTS:
            raise SpecProblem(
                f"spec.template.volumes[{index}].name {volume['name']!r} is a volume the operator adds; rename it"
            )
    taken = set(OPERATOR_MOUNTS.values())
    for index, mount in enumerate(template.volume_mounts or []):
        path = str(mount.get("mountPath", "")).rstrip("/")
        if path in taken:
            raise SpecProblem(
                f"spec.template.volumeMounts[{index}].mountPath {path!r} is where the operator mounts "
                f"{next(v for v, p in OPERATOR_MOUNTS.items() if p == path)!r}; mount it elsewhere"
            )
    names = [c["name"] for c in (template.init_containers or []) + (template.sidecars or [])]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise SpecProblem(f"spec.template: container name {repeated[0]!r} is used twice in initContainers/sidecars")
    gang = spec.gang_scheduling
    if gang and gang.scheduler_name and template.scheduler_name and gang.scheduler_name != template.scheduler_name:
        raise SpecProblem(
            f"spec.template.schedulerName {template.scheduler_name!r} and spec.gangScheduling.schedulerName "
            f"{gang.scheduler_name!r} disagree; set one"
        )


# Said in `kubectl describe` of a job that runs without a claim (see status.py).
EPHEMERAL_STORAGE_REASON = "EphemeralStorage"
EPHEMERAL_STORAGE_MESSAGE = (
    "spec.storage.emptyDir: outputs and checkpoints live in worker-0's pod and vanish with it; a gang restart "
    "starts from step 0. Set spec.storage.persistentVolumeClaim to keep them."
)


def storage_notice(spec: FineTuneJobSpec) -> str | None:
    """What a job's describe output should say about its storage, if anything."""
    return EPHEMERAL_STORAGE_MESSAGE if spec.storage.empty_dir is not None else None


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
    document = config.model_dump(mode="json", by_alias=True, exclude_none=True)
    return yaml.dump(document, Dumper=YAML_DUMPER, sort_keys=False)


def spec_fields(spec: FineTuneJobSpec) -> dict[str, Any]:
    """A spec as stored: the form the spec-edit policy compares and keeps."""
    return spec.model_dump(mode="json", by_alias=True, exclude_none=True)


def accepted_spec_annotation(spec: FineTuneJobSpec) -> dict[str, str]:
    return {ACCEPTED_SPEC_ANNOTATION: json.dumps(spec_fields(spec), separators=(",", ":"), sort_keys=True)}


def build_trainer_config_map(job: FineTuneJob) -> dict[str, Any]:
    """job.spec: the spec accepted (see the spec-edit policy); the annotation keeps it for later edits."""
    metadata = _metadata(job, CONFIG_MAP_NAME.format(job=job.name), job_labels(job.name))
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {**metadata, "annotations": accepted_spec_annotation(job.spec)},
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


def _output_volume(job: FineTuneJob, rank: int, settings: OperatorSettings) -> dict[str, Any]:
    """The claim in worker-0 only (ReadWriteOnce works across nodes: only rank 0 writes or reads outputs);
    the other workers get a scratch folder at the same path."""
    storage = job.spec.storage
    if rank == 0 and storage.persistent_volume_claim:
        return {"name": "output", "persistentVolumeClaim": {"claimName": storage.persistent_volume_claim.claim_name}}
    size = storage.empty_dir.size_limit if rank == 0 and storage.empty_dir else settings.tmp_size
    return {"name": "output", "emptyDir": {"sizeLimit": size} if size else {}}


def _output_mount(job: FineTuneJob, rank: int) -> dict[str, Any]:
    storage = job.spec.storage
    if rank == 0 and storage.persistent_volume_claim:
        return {"name": "output", "mountPath": OUTPUT_MOUNT_PATH, "subPath": storage.sub_path or job.name}
    return {"name": "output", "mountPath": OUTPUT_MOUNT_PATH}


def _model_cache_size(spec: FineTuneJobSpec, settings: OperatorSettings) -> str | None:
    """Size of a node-local model cache, or None when the cache is a claim or unsized."""
    cache = spec.storage.model_cache
    if cache and cache.persistent_volume_claim:
        return None
    return (cache.size_limit if cache else None) or settings.model_cache_size


def _model_cache_volume(spec: FineTuneJobSpec, settings: OperatorSettings) -> dict[str, Any]:
    cache = spec.storage.model_cache
    if cache and cache.persistent_volume_claim:
        return {"name": "model-cache", "persistentVolumeClaim": {"claimName": cache.persistent_volume_claim.claim_name}}
    size = _model_cache_size(spec, settings)
    return {"name": "model-cache", "emptyDir": {"sizeLimit": size} if size else {}}


def _resources(spec: FineTuneJobSpec, settings: OperatorSettings) -> dict[str, Any]:
    """The trainer's resources: the job's own, else the operator's defaults per GPU, and the GPUs."""
    # Quantities are strings in the Pod API ("8", "64Gi"); YAML may have given numbers.
    resources = {
        kind: {name: str(q) for name, q in amounts.items()} for kind, amounts in (spec.template.resources or {}).items()
    }
    requests, limits = resources.setdefault("requests", {}), resources.setdefault("limits", {})
    units = spec.processes_per_worker  # GPUs, or the one process of a CPU worker
    if settings.cpu_per_gpu and "cpu" not in requests and "cpu" not in limits:
        requests["cpu"] = scale_quantity(settings.cpu_per_gpu, units)
    if settings.memory_per_gpu and "memory" not in requests and "memory" not in limits:
        requests["memory"] = limits["memory"] = scale_quantity(settings.memory_per_gpu, units)
    cache_size = _model_cache_size(spec, settings)
    if cache_size and "ephemeral-storage" not in requests:
        requests["ephemeral-storage"] = cache_size  # the scheduler then picks a node with the disk for it
    if spec.gpus_per_worker > 0:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(spec.gpus_per_worker)
    return {kind: amounts for kind, amounts in resources.items() if amounts}


def _threads_per_process(spec: FineTuneJobSpec, resources: dict[str, Any]) -> int | None:
    """OMP_NUM_THREADS: the pod's CPUs shared among its processes (8 GPU processes must not each take all)."""
    cpu = (resources.get("requests") or {}).get("cpu") or (resources.get("limits") or {}).get("cpu")
    cores = cpu_cores(cpu) if cpu else None
    return max(1, int(cores // spec.processes_per_worker)) if cores else None


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
    "runAsUser": WORKER_UID,
    "runAsGroup": WORKER_UID,
    "fsGroup": WORKER_UID,
    "seccompProfile": {"type": "RuntimeDefault"},
}
# Volumes and mount paths the operator wires into every worker: spec.template may not take them over.
OPERATOR_MOUNTS = {
    "config": CONFIG_MOUNT_PATH,
    "output": OUTPUT_MOUNT_PATH,
    "scratch": SCRATCH_PATH,
    "dshm": SHM_PATH,
    "model-cache": MODEL_CACHE_PATH,
    "service-account-token": SERVICE_ACCOUNT_DIR,
}


def _trainer_security_context(spec: FineTuneJobSpec) -> dict[str, Any]:
    capabilities: dict[str, Any] = {"drop": ["ALL"]}
    if spec.template.capabilities:
        capabilities["add"] = list(spec.template.capabilities)
    return {**CONTAINER_SECURITY_CONTEXT, "capabilities": capabilities}


def _with_security_defaults(container: dict[str, Any]) -> dict[str, Any]:
    """A user's init or sidecar container: the workers' hardening wherever it says nothing else."""
    return {**container, "securityContext": {**CONTAINER_SECURITY_CONTEXT, **(container.get("securityContext") or {})}}


def _image_pull_secrets(spec: FineTuneJobSpec, settings: OperatorSettings) -> list[dict[str, str]]:
    names = [*settings.image_pull_secrets, *(ref.name for ref in spec.template.image_pull_secrets or [])]
    return [{"name": name} for name in dict.fromkeys(names)]


def _scheduling_metadata(job: FineTuneJob, attempt: int) -> tuple[dict[str, str], dict[str, str]]:
    """Labels and annotations that hand the gang to Kueue and to a gang scheduler."""
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    queue = (job.metadata.get("labels") or {}).get(KUEUE_QUEUE_LABEL)
    if queue:
        # Each attempt is one Kueue pod group, admitted whole. Kueue keeps a finalizer on a group's failed
        # pods until replacements come, but a gang restart reuses the workers' names and waits for the old
        # pods to go: so the group is not retriable, and ends (freeing its quota and its pods) once the
        # operator has deleted it; the next attempt queues as a group of its own.
        group = KUEUE_POD_GROUP_NAME.format(job=job.name, attempt=attempt)
        labels |= {KUEUE_QUEUE_LABEL: queue, KUEUE_POD_GROUP_LABEL: group}
        annotations |= {KUEUE_POD_GROUP_COUNT_ANNOTATION: str(job.spec.workers), KUEUE_RETRIABLE_ANNOTATION: "false"}
    if job.spec.gang_scheduling is not None:
        labels[POD_GROUP_LABEL] = POD_GROUP_NAME.format(job=job.name)
    return labels, annotations


def _env(spec: FineTuneJobSpec, wiring: dict[str, str], threads: int | None) -> list[dict[str, Any]]:
    user = [var.model_dump(by_alias=True, exclude_none=True) for var in spec.template.env or []]
    # Read-only root filesystem: what a trainer writes goes to volumes; the job's env may move these.
    defaults = {
        "HOME": SCRATCH_PATH,
        "HF_HOME": MODEL_CACHE_PATH,
        "TRITON_CACHE_DIR": f"{SCRATCH_PATH}/triton",
        COLLECTIVE_TIMEOUT_ENV: str(collective_timeout(spec.restart_policy.progress_deadline_seconds)),
    }
    if threads:
        defaults["OMP_NUM_THREADS"] = str(threads)
    overridden = {var["name"] for var in user}
    defaults = {name: value for name, value in defaults.items() if name not in overridden}
    return [{"name": k, "value": v} for k, v in (defaults | wiring).items()] + user


def restart_env(job: FineTuneJob, attempt: int) -> dict[str, str]:
    """What each pod's elastic agent needs to restart the gang in place: the strategy, the gang's rendezvous id
    (an older attempt's agents cannot join it), the restarts left and the backoff to go on with."""
    policy, spent = job.spec.restart_policy, job.status.restarts
    return {
        RESTART_STRATEGY_ENV: RestartStrategyName(policy.strategy).value,
        RUN_ID_ENV: f"{job.uid}-{attempt}",
        MAX_IN_PLACE_RESTARTS_ENV: str(max(policy.max_restarts - spent, 0)),
        RESTARTS_SPENT_ENV: str(spent),
        RESTART_BACKOFF_ENV: str(policy.backoff_seconds),
        MAX_RESTART_BACKOFF_ENV: str(policy.max_backoff_seconds),
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
        GPUS_PER_WORKER_ENV: str(spec.gpus_per_worker),
    } | restart_env(job, attempt)
    if settings.trainer_metrics_port:
        wiring[METRICS_PORT_ENV] = str(settings.trainer_metrics_port)  # rank 0 serves /metrics there
    template = with_pod_defaults(
        spec.template, settings.pod_defaults, gpus=spec.gpus_per_worker, gpu_toleration=settings.gpu_toleration
    )
    resources = _resources(spec, settings)
    container = {
        "name": TRAINER_CONTAINER,
        "image": spec.image or settings.trainer_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": spec.command or DEFAULT_COMMAND,
        "env": _env(spec, wiring, _threads_per_process(spec, resources)),
        "envFrom": template.env_from or [],
        "resources": resources,
        "ports": _container_ports(settings),
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_MOUNT_PATH, "readOnly": True},
            _output_mount(job, rank),
            {"name": "scratch", "mountPath": SCRATCH_PATH},
            {"name": "dshm", "mountPath": SHM_PATH},
            {"name": "model-cache", "mountPath": MODEL_CACHE_PATH},
            {"name": "service-account-token", "mountPath": SERVICE_ACCOUNT_DIR, "readOnly": True},
            *(template.volume_mounts or []),
        ],
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": _trainer_security_context(spec),
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
        # The trainer first: the worker's outcome is its container's, whatever the sidecars do.
        "containers": [container, *map(_with_security_defaults, template.sidecars or [])],
        "volumes": [
            {"name": "config", "configMap": {"name": CONFIG_MAP_NAME.format(job=job.name)}},
            _output_volume(job, rank, settings),
            {"name": "scratch", "emptyDir": {"sizeLimit": settings.tmp_size}},
            # NCCL and DataLoader workers need more shared memory than a container's 64 MiB default.
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": settings.shm_size}},
            _model_cache_volume(spec, settings),
            SERVICE_ACCOUNT_TOKEN_VOLUME,
            *(template.volumes or []),
        ],
    }
    optional = {
        "initContainers": [_with_security_defaults(c) for c in template.init_containers or []],
        "imagePullSecrets": _image_pull_secrets(spec, settings),
        "nodeSelector": template.node_selector,
        "tolerations": template.tolerations,
        "affinity": template.affinity,
        "topologySpreadConstraints": template.topology_spread_constraints,
        "priorityClassName": template.priority_class_name,
        "runtimeClassName": template.runtime_class_name,
        "schedulerName": _scheduler_name(spec, settings),
    }
    pod_spec |= {key: value for key, value in optional.items() if value}
    scheduling_labels, scheduling_annotations = _scheduling_metadata(job, attempt)
    labels = {**(template.labels or {}), **scheduling_labels, **worker_labels(job.name, rank, attempt)}
    metadata = _metadata(job, name, labels)
    metadata["annotations"] = {
        **(template.annotations or {}),
        **scheduling_annotations,
        DEFAULT_CONTAINER_ANNOTATION: TRAINER_CONTAINER,
    }
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}


def _container_ports(settings: OperatorSettings) -> list[dict[str, Any]]:
    ports: list[dict[str, Any]] = [{"name": "rendezvous", "containerPort": MASTER_PORT}]
    if settings.trainer_metrics_port:
        ports.append({"name": METRICS_PORT_NAME, "containerPort": settings.trainer_metrics_port, "protocol": "TCP"})
    return ports


def _scheduler_name(spec: FineTuneJobSpec, settings: OperatorSettings) -> str | None:
    if spec.gang_scheduling is None:
        return spec.template.scheduler_name
    return spec.gang_scheduling.scheduler_name or spec.template.scheduler_name or settings.gang_scheduler_name


def build_pod_group(job: FineTuneJob) -> dict[str, Any]:
    """scheduler-plugins' PodGroup: the coscheduling scheduler binds none of the workers until all fit."""
    group_spec: dict[str, Any] = {"minMember": job.spec.workers}
    timeout = job.spec.gang_scheduling.schedule_timeout_seconds if job.spec.gang_scheduling else None
    if timeout:
        group_spec["scheduleTimeoutSeconds"] = timeout
    return {
        "apiVersion": POD_GROUP_API_VERSION,
        "kind": "PodGroup",
        "metadata": _metadata(job, POD_GROUP_NAME.format(job=job.name), job_labels(job.name)),
        "spec": group_spec,
    }


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


def build_failure_config_map(job: FineTuneJob, attempt: int, outputs: dict[str, str]) -> dict[str, Any]:
    """The failed workers' termination messages (by pod) of the attempt a gang restart deletes: what they
    printed last outlives their pods, until the next restart's replaces it or the job goes."""
    labels = {**job_labels(job.name), LABEL_ATTEMPT: str(attempt)}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, FAILURE_CONFIG_MAP_NAME.format(job=job.name), labels),
        "data": outputs,
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


def build_gang_prerequisites(job: FineTuneJob) -> list[dict[str, Any]]:
    """What a job owns that its worker pods need before they are created: the API server admits a pod only
    with its ServiceAccount, the kubelet mounts its config, the scheduler looks its PodGroup up by label."""
    resources = [build_trainer_config_map(job)]
    if not job.spec.template.service_account_name:
        resources.append(build_trainer_service_account(job))
    if job.spec.gang_scheduling is not None:
        resources.append(build_pod_group(job))
    return resources


def build_gang_companions(job: FineTuneJob) -> list[dict[str, Any]]:
    """What a job owns that its running workers use (their DNS names, progress reporting), in creation order:
    a RoleBinding after its Role, and the progress ConfigMap last, as the mark that all of them exist."""
    return [
        build_headless_service(job),
        build_progress_role(job),
        build_progress_role_binding(job),
        build_progress_config_map(job),
    ]


def build_job_resources(job: FineTuneJob) -> list[dict[str, Any]]:
    """Everything a job owns besides its worker pods."""
    return build_gang_prerequisites(job) + build_gang_companions(job)
