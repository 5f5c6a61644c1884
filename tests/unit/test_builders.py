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
