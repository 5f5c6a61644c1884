"""Pure builders: names, the torchrun env, GPUs, labels, owners, security and the storage mount."""

import pytest

from finetune_operator import builders
from finetune_operator.builders import SpecProblem, build_gang, build_worker_pod, check_runnable, max_job_name_length


def env_of(pod):
    return {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}


def test_worker_pod_carries_the_torchrun_wiring(make_job, settings):
    job = make_job(workers=3, gpusPerWorker=0)
    pod = build_worker_pod(job, rank=2, attempt=1, settings=settings)
    env = env_of(pod)
    assert pod["metadata"]["name"] == "llama-worker-2"
    assert (pod["spec"]["hostname"], pod["spec"]["subdomain"]) == ("llama-worker-2", "llama")
    assert env["MASTER_ADDR"] == env["PET_MASTER_ADDR"] == "llama-worker-0.llama.ml.svc"
    assert env["MASTER_PORT"] == env["PET_MASTER_PORT"] == "29500"
    assert (env["WORLD_SIZE"], env["NNODES"], env["NODE_RANK"], env["NPROC_PER_NODE"], env["RANK"]) == (
        "3",
        "3",
        "2",
        "1",
        "2",
    )
    assert (env["PET_NNODES"], env["PET_NODE_RANK"], env["PET_NPROC_PER_NODE"]) == ("3", "2", "1")
    assert env["PYTHONUNBUFFERED"] == "1"


def test_multi_gpu_workers_leave_rank_to_the_launcher(make_job, settings):
    pod = build_worker_pod(make_job(workers=2, gpusPerWorker=4), rank=1, attempt=0, settings=settings)
    env = env_of(pod)
    assert (env["WORLD_SIZE"], env["NPROC_PER_NODE"]) == ("8", "4")
    assert "RANK" not in env, "one pod runs 4 ranks: RANK is per process"
    resources = pod["spec"]["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "4"


def test_cpu_workers_request_no_gpu(make_job, settings):
    pod = build_worker_pod(make_job(gpusPerWorker=0), rank=0, attempt=0, settings=settings)
    assert "nvidia.com/gpu" not in str(pod["spec"]["containers"][0]["resources"])


def test_labels_owner_and_restart_policy(make_job, settings):
    pod = build_worker_pod(make_job(), rank=1, attempt=3, settings=settings)
    labels = pod["metadata"]["labels"]
    assert (labels["finetune.dev/job"], labels["finetune.dev/rank"], labels["finetune.dev/attempt"]) == (
        "llama",
        "1",
        "3",
    )
    owner = pod["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("FineTuneJob", "uid-1", True)
    assert pod["spec"]["restartPolicy"] == "Never"
    assert pod["spec"]["containers"][0]["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_image_and_command_default_from_settings(make_job, settings):
    default = build_worker_pod(make_job(), 0, 0, settings)["spec"]["containers"][0]
    assert default["image"] == "registry.example/trainer:1"
    assert default["command"] == ["finetune", "train", "--config", "/etc/finetune/config.yaml"]
    own = build_worker_pod(make_job(image="me/img:2", command=["torchrun", "train.py"]), 0, 0, settings)
    assert own["spec"]["containers"][0]["image"] == "me/img:2"
    assert own["spec"]["containers"][0]["command"] == ["torchrun", "train.py"]


def test_storage_mounts_the_claim_under_the_job_name(make_job, settings):
    pod = build_worker_pod(make_job(storage={"persistentVolumeClaim": {"claimName": "runs"}}), 0, 0, settings)
    mounts = {m["name"]: m for m in pod["spec"]["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["output"]["persistentVolumeClaim"] == {"claimName": "runs"}
    assert (mounts["output"]["mountPath"], mounts["output"]["subPath"]) == ("/mnt/finetune/output", "llama")
    assert mounts["config"]["readOnly"] is True
    no_claim = build_worker_pod(make_job(), 0, 0, settings)
    assert {v["name"]: v for v in no_claim["spec"]["volumes"]}["output"] == {"name": "output", "emptyDir": {}}


def test_pods_are_hardened(make_job, settings):
    pod = build_worker_pod(make_job(), 0, 0, settings)
    container = pod["spec"]["containers"][0]["securityContext"]
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"] == {"drop": ["ALL"]}
    assert container["readOnlyRootFilesystem"] is True
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["spec"]["serviceAccountName"] == "llama-trainer"
    # A projected token instead of automounting: no wait for a token Secret on clusters before 1.24.
    assert pod["spec"]["automountServiceAccountToken"] is False
    token = next(v for v in pod["spec"]["volumes"] if v["name"] == "service-account-token")
    assert {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}} in token["projected"]["sources"]


def test_template_overrides_reach_the_pod(make_job, settings):
    template = {
        "nodeSelector": {"gpu": "h100"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
        "priorityClassName": "training",
        "schedulerName": "volcano",
        "serviceAccountName": "custom",
        "env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}],
        "envFrom": [{"configMapRef": {"name": "extra"}}],
        "labels": {"team": "nlp"},
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "datasets"}}],
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
        "resources": {"limits": {"memory": "64Gi"}},
    }
    pod = build_worker_pod(make_job(template=template), 0, 0, settings)
    spec, container = pod["spec"], pod["spec"]["containers"][0]
    assert (spec["nodeSelector"], spec["priorityClassName"], spec["schedulerName"]) == (
        {"gpu": "h100"},
        "training",
        "volcano",
    )
    assert spec["serviceAccountName"] == "custom"
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in container["env"]
    assert container["envFrom"] == [{"configMapRef": {"name": "extra"}}]
    assert pod["metadata"]["labels"]["team"] == "nlp"
    assert container["resources"]["limits"] == {"memory": "64Gi", "nvidia.com/gpu": "1"}
    assert "/data" in [m["mountPath"] for m in container["volumeMounts"]]


def test_gang_has_one_pod_per_rank(make_job, settings):
    gang = build_gang(make_job(workers=4), attempt=2, settings=settings)
    assert [p["metadata"]["name"] for p in gang] == [f"llama-worker-{r}" for r in range(4)]


def test_headless_service_publishes_not_ready_workers(make_job):
    service = builders.build_headless_service(make_job())
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"]["finetune.dev/job"] == "llama"


def test_trainer_config_map_holds_the_training_fields(make_job):
    import yaml

    data = builders.build_trainer_config_map(make_job(training={"maxSteps": 5}))["data"]["config.yaml"]
    config = yaml.safe_load(data)
    assert config["outputDir"] == "/mnt/finetune/output"
    assert config["training"]["maxSteps"] == 5
    assert "workers" not in config


def test_trainer_may_only_patch_its_own_progress(make_job):
    role = builders.build_progress_role(make_job())
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["llama-progress"], "verbs": ["get", "patch"]}
    ]


@pytest.mark.parametrize("workers", [1, 10, 1000])
def test_longest_job_name_yields_valid_hostnames(workers):
    longest = max_job_name_length(workers)
    hostname = builders.WORKER_NAME.format(job="j" * longest, rank=workers - 1)
    assert len(hostname) <= 63 < len(builders.WORKER_NAME.format(job="j" * (longest + 1), rank=workers - 1)) or (
        len(builders.PROGRESS_CONFIG_MAP_NAME.format(job="j" * (longest + 1))) > 63
    )


@pytest.mark.parametrize(("name", "problem"), [("x" * 60, "at most"), ("9lives", "DNS-1035")])
def test_unrunnable_names_are_refused(make_job, name, problem):
    with pytest.raises(SpecProblem, match=problem):
        check_runnable(make_job(name=name))


# --- a real GPU cluster: storage, resources, the pod template, queueing -----------------------------------

CLAIM = {"persistentVolumeClaim": {"claimName": "runs"}}
GPU_SETTINGS = {"cpu_per_gpu": "4", "memory_per_gpu": "32Gi", "model_cache_size": "50Gi"}


def volumes_of(pod):
    return {v["name"]: v for v in pod["spec"]["volumes"]}


def mounts_of(pod, index=0):
    return {m["name"]: m for m in pod["spec"]["containers"][index]["volumeMounts"]}


def test_only_worker_0_mounts_the_output_claim(make_job, settings):
    """A ReadWriteOnce claim attaches to one node: only rank 0 reads and writes outputs and checkpoints."""
    job = make_job(workers=3, storage=CLAIM)
    first, *others = build_gang(job, attempt=0, settings=settings)
    assert volumes_of(first)["output"]["persistentVolumeClaim"] == {"claimName": "runs"}
    assert mounts_of(first)["output"] == {"name": "output", "mountPath": "/mnt/finetune/output", "subPath": "llama"}
    for pod in others:
        assert "persistentVolumeClaim" not in str(pod["spec"]["volumes"]), pod["metadata"]["name"]
        assert volumes_of(pod)["output"] == {"name": "output", "emptyDir": {"sizeLimit": "10Gi"}}
        assert "subPath" not in mounts_of(pod)["output"]


def test_running_without_a_claim_is_stated_and_said(make_job, settings):
    job = make_job(storage={"emptyDir": {"sizeLimit": "20Gi"}})
    assert volumes_of(build_worker_pod(job, 0, 0, settings))["output"]["emptyDir"] == {"sizeLimit": "20Gi"}
    assert "vanish" in builders.storage_notice(job.spec)
    assert builders.storage_notice(make_job(storage=CLAIM).spec) is None


def test_model_cache_is_node_local_with_a_size_or_a_claim(make_job, settings):
    sized = settings.model_copy(update={"model_cache_size": "50Gi"})
    pod = build_worker_pod(make_job(), 1, 0, sized)
    assert volumes_of(pod)["model-cache"] == {"name": "model-cache", "emptyDir": {"sizeLimit": "50Gi"}}
    assert mounts_of(pod)["model-cache"]["mountPath"] == env_of(pod)["HF_HOME"] == "/var/cache/huggingface"
    assert pod["spec"]["containers"][0]["resources"]["requests"]["ephemeral-storage"] == "50Gi"
    own_size = build_worker_pod(make_job(storage={"emptyDir": {}, "modelCache": {"sizeLimit": "200Gi"}}), 0, 0, sized)
    assert own_size["spec"]["containers"][0]["resources"]["requests"]["ephemeral-storage"] == "200Gi"
    claim = {"emptyDir": {}, "modelCache": {"persistentVolumeClaim": {"claimName": "hf-cache"}}}
    cached = build_worker_pod(make_job(storage=claim), 1, 0, sized)
    assert volumes_of(cached)["model-cache"]["persistentVolumeClaim"] == {"claimName": "hf-cache"}
    assert "ephemeral-storage" not in str(cached["spec"]["containers"][0]["resources"])


def test_scratch_volumes_have_size_limits(make_job, settings):
    volumes = volumes_of(build_worker_pod(make_job(), 0, 0, settings))
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert volumes["scratch"]["emptyDir"] == {"sizeLimit": "10Gi"}


@pytest.mark.parametrize(
    ("gpus", "template", "requests", "limits", "threads"),
    [
        (8, None, {"cpu": "32", "memory": "256Gi", "ephemeral-storage": "50Gi", "nvidia.com/gpu": "8"}, "256Gi", "4"),
        (0, None, {"cpu": "4", "memory": "32Gi", "ephemeral-storage": "50Gi"}, "32Gi", "4"),
        # The job's own amounts win; OMP_NUM_THREADS follows its CPUs.
        (4, {"requests": {"cpu": 48, "memory": "200Gi"}}, {"cpu": "48", "memory": "200Gi"}, None, "12"),
        (2, {"limits": {"memory": "100Gi"}, "requests": {"cpu": "500m"}}, {"cpu": "500m"}, "100Gi", "1"),
    ],
)
def test_default_requests_per_gpu_and_threads_per_process(make_job, gpus, template, requests, limits, threads):
    from finetune_operator.config import OperatorSettings

    job = make_job(gpusPerWorker=gpus, template={"resources": template} if template else {})
    pod = build_worker_pod(job, 0, 0, OperatorSettings(**GPU_SETTINGS))
    resources = pod["spec"]["containers"][0]["resources"]
    assert {k: v for k, v in resources["requests"].items() if k in requests} == requests
    assert resources.get("limits", {}).get("memory") == limits
    assert env_of(pod)["OMP_NUM_THREADS"] == threads


def test_no_default_requests_without_settings_and_user_threads_win(make_job, settings):
    pod = build_worker_pod(make_job(template={"env": [{"name": "OMP_NUM_THREADS", "value": "3"}]}), 0, 0, settings)
    resources = pod["spec"]["containers"][0]["resources"]
    assert "cpu" not in str(resources) and "memory" not in str(resources)
    assert [e for e in pod["spec"]["containers"][0]["env"] if e["name"] == "OMP_NUM_THREADS"] == [
        {"name": "OMP_NUM_THREADS", "value": "3"}
    ]


def test_pull_secrets_from_settings_and_job(make_job, settings):
    with_default = settings.model_copy(update={"image_pull_secrets": ["regcred", "mirror"]})
    job = make_job(template={"imagePullSecrets": [{"name": "team"}, {"name": "regcred"}]})
    assert build_worker_pod(job, 0, 0, with_default)["spec"]["imagePullSecrets"] == [
        {"name": "regcred"},
        {"name": "mirror"},
        {"name": "team"},
    ]
    assert "imagePullSecrets" not in build_worker_pod(make_job(), 0, 0, settings)["spec"]


def test_placement_and_runtime_reach_the_pod(make_job, settings):
    spread = [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "DoNotSchedule"}]
    job = make_job(template={"topologySpreadConstraints": spread, "runtimeClassName": "nvidia"})
    spec = build_worker_pod(job, 0, 0, settings)["spec"]
    assert (spec["topologySpreadConstraints"], spec["runtimeClassName"]) == (spread, "nvidia")


def test_init_containers_and_sidecars_get_the_security_defaults(make_job, settings):
    template = {
        "initContainers": [{"name": "fetch", "image": "busybox", "command": ["true"]}],
        "sidecars": [{"name": "shipper", "image": "fluent-bit", "securityContext": {"readOnlyRootFilesystem": False}}],
    }
    pod = build_worker_pod(make_job(template=template), 0, 0, settings)
    containers = pod["spec"]["containers"]
    assert [c["name"] for c in containers] == ["trainer", "shipper"], "the trainer comes first"
    assert pod["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == "trainer"
    init = pod["spec"]["initContainers"][0]["securityContext"]
    assert (init["allowPrivilegeEscalation"], init["capabilities"], init["runAsNonRoot"]) == (
        False,
        {"drop": ["ALL"]},
        True,
    )
    sidecar = containers[1]["securityContext"]
    assert sidecar["readOnlyRootFilesystem"] is False and sidecar["allowPrivilegeEscalation"] is False


def test_added_capabilities_keep_everything_else_dropped(make_job, settings):
    pod = build_worker_pod(make_job(template={"capabilities": ["IPC_LOCK"]}), 0, 0, settings)
    security = pod["spec"]["containers"][0]["securityContext"]
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    assert security["allowPrivilegeEscalation"] is False and security["runAsNonRoot"] is True


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ({"volumes": [{"name": "output", "emptyDir": {}}]}, r"spec.template.volumes\[0\].name 'output'"),
        ({"volumeMounts": [{"name": "x", "mountPath": "/dev/shm/"}]}, r"spec.template.volumeMounts\[0\].mountPath"),
        ({"volumeMounts": [{"name": "x", "mountPath": "/etc/finetune"}]}, "'config'"),
        (
            {"initContainers": [{"name": "a", "image": "i"}], "sidecars": [{"name": "a", "image": "i"}]},
            "'a' is used twice",
        ),
        ({"schedulerName": "volcano"}, "disagree"),
    ],
)
def test_the_operators_wiring_cannot_be_taken_over(make_job, template, problem):
    with pytest.raises(SpecProblem, match=problem):
        check_runnable(make_job(template=template, gangScheduling={"schedulerName": "coscheduler"}))


def test_kueue_queue_label_makes_the_gang_one_pod_group(make_job, settings):
    job = make_job()
    job.metadata["labels"] = {"kueue.x-k8s.io/queue-name": "gpu-queue"}
    for pod in build_gang(job, attempt=1, settings=settings):
        labels, annotations = pod["metadata"]["labels"], pod["metadata"]["annotations"]
        assert labels["kueue.x-k8s.io/queue-name"] == "gpu-queue"
        assert labels["kueue.x-k8s.io/pod-group-name"] == "llama-1", "one group per attempt"
        assert annotations["kueue.x-k8s.io/pod-group-total-count"] == "2"
        assert annotations["kueue.x-k8s.io/retriable-in-group"] == "false", "a deleted gang frees its quota"
    plain = build_worker_pod(make_job(), 0, 0, settings)["metadata"]
    assert "kueue" not in str(plain)


def test_gang_scheduling_makes_a_pod_group_and_picks_the_scheduler(make_job, settings):
    job = make_job(workers=4, gangScheduling={"scheduleTimeoutSeconds": 600})
    group = builders.build_pod_group(job)
    assert (group["apiVersion"], group["kind"], group["metadata"]["name"]) == (
        "scheduling.x-k8s.io/v1alpha1",
        "PodGroup",
        "llama",
    )
    assert group["spec"] == {"minMember": 4, "scheduleTimeoutSeconds": 600}
    assert group["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert group in builders.build_job_resources(job)
    for pod in build_gang(job, 0, settings):
        assert pod["metadata"]["labels"]["scheduling.x-k8s.io/pod-group"] == "llama"
        assert pod["spec"]["schedulerName"] == "scheduler-plugins-scheduler"
    own = make_job(gangScheduling={"schedulerName": "coscheduler"})
    assert build_worker_pod(own, 0, 0, settings)["spec"]["schedulerName"] == "coscheduler"
    assert not [o for o in builders.build_job_resources(make_job()) if o["kind"] == "PodGroup"]
    assert "schedulerName" not in build_worker_pod(make_job(), 0, 0, settings)["spec"]


def test_workers_run_as_a_uid_above_host_ranges(make_job, settings):
    security = build_worker_pod(make_job(), 0, 0, settings)["spec"]["securityContext"]
    assert security["runAsUser"] == security["runAsGroup"] == security["fsGroup"] == 65532


@pytest.mark.parametrize(
    ("restart_policy", "timeout"),
    [({}, "900"), ({"progressDeadlineSeconds": 60}, "30"), ({"progressDeadlineSeconds": 0}, "1800")],
)
def test_collectives_time_out_well_inside_the_progress_deadline(make_job, settings, restart_policy, timeout):
    """A rank hung in a collective fails every waiting pod (retryably) before the gang would be called Stalled."""
    env = env_of(build_worker_pod(make_job(restartPolicy=restart_policy), 0, 0, settings))
    assert env["FINETUNE_COLLECTIVE_TIMEOUT"] == timeout


def test_the_jobs_env_may_set_its_own_collective_timeout(make_job, settings):
    job = make_job(template={"env": [{"name": "FINETUNE_COLLECTIVE_TIMEOUT", "value": "3600"}]})
    env = build_worker_pod(job, 0, 0, settings)["spec"]["containers"][0]["env"]
    assert [e for e in env if e["name"] == "FINETUNE_COLLECTIVE_TIMEOUT"] == [
        {"name": "FINETUNE_COLLECTIVE_TIMEOUT", "value": "3600"}
    ]
