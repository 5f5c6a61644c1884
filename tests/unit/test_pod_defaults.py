"""Platform defaults for worker pods (chart trainer.podDefaults) under each job's own template."""

import pytest

from finetune_operator.builders import build_worker_pod
from finetune_operator.pod_defaults import GPU_TOLERATION, PodDefaults

DEDICATED = {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}
ZONE_AFFINITY = {
    "nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]
        }
    }
}
PLATFORM = PodDefaults.model_validate(
    {
        "tolerations": [DEDICATED],
        "nodeSelector": {"pool": "gpu", "karpenter.sh/capacity-type": "on-demand"},
        "affinity": ZONE_AFFINITY,
        "priorityClassName": "training",
        "labels": {"team": "platform", "cost-center": "ml"},
        "annotations": {"karpenter.sh/do-not-disrupt": "true"},
    }
)


@pytest.fixture
def platform(settings):
    return settings.model_copy(update={"pod_defaults": PLATFORM})


def spec_of(pod):
    return pod["spec"]


def test_every_worker_gets_the_platform_defaults(make_job, platform):
    for rank in (0, 1):
        pod = build_worker_pod(make_job(gpusPerWorker=0), rank, 0, platform)
        spec = spec_of(pod)
        assert spec["tolerations"] == [DEDICATED]
        assert spec["nodeSelector"] == {"pool": "gpu", "karpenter.sh/capacity-type": "on-demand"}
        assert spec["affinity"] == ZONE_AFFINITY
        assert spec["priorityClassName"] == "training"
        assert pod["metadata"]["labels"]["team"] == "platform"
        assert pod["metadata"]["annotations"]["karpenter.sh/do-not-disrupt"] == "true"


def test_the_jobs_own_template_wins(make_job, platform):
    own_affinity = {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}}
    anti = {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}}
    template = {
        "nodeSelector": {"pool": "h100"},
        "tolerations": [{"key": "spot", "operator": "Exists"}],
        "affinity": {**own_affinity, **anti},
        "priorityClassName": "urgent",
        "labels": {"team": "research"},
        "annotations": {"karpenter.sh/do-not-disrupt": "false"},
    }
    pod = build_worker_pod(make_job(gpusPerWorker=0, template=template), 0, 0, platform)
    spec = spec_of(pod)
    assert spec["nodeSelector"] == {"pool": "h100", "karpenter.sh/capacity-type": "on-demand"}
    assert spec["tolerations"] == [{"key": "spot", "operator": "Exists"}, DEDICATED], "the job's first, then the rest"
    assert spec["affinity"] == {**own_affinity, **anti}, "the job's nodeAffinity replaces the default's whole"
    assert spec["priorityClassName"] == "urgent"
    assert (pod["metadata"]["labels"]["team"], pod["metadata"]["labels"]["cost-center"]) == ("research", "ml")
    assert pod["metadata"]["annotations"]["karpenter.sh/do-not-disrupt"] == "false"


def test_defaults_never_take_over_the_operators_labels(make_job, settings):
    taker = settings.model_copy(update={"pod_defaults": PodDefaults(labels={"finetune.dev/job": "other"})})
    pod = build_worker_pod(make_job(), 0, 0, taker)
    assert pod["metadata"]["labels"]["finetune.dev/job"] == "llama"


def test_gpu_workers_tolerate_the_gpu_taint(make_job, settings):
    assert spec_of(build_worker_pod(make_job(gpusPerWorker=2), 0, 0, settings))["tolerations"] == [GPU_TOLERATION]
    assert "tolerations" not in spec_of(build_worker_pod(make_job(gpusPerWorker=0), 0, 0, settings))


@pytest.mark.parametrize(
    "own",
    [
        [{"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"}],
        [{"operator": "Exists"}],  # tolerates every taint
    ],
)
def test_a_job_that_tolerates_the_gpu_taint_gets_no_second_toleration(make_job, settings, own):
    pod = build_worker_pod(make_job(gpusPerWorker=1, template={"tolerations": own}), 0, 0, settings)
    assert spec_of(pod)["tolerations"] == own


def test_the_gpu_toleration_can_be_turned_off(make_job, settings):
    off = settings.model_copy(update={"gpu_toleration": False})
    assert "tolerations" not in spec_of(build_worker_pod(make_job(gpusPerWorker=8), 0, 0, off))


def test_pod_defaults_read_from_the_env_as_json(monkeypatch):
    from finetune_operator.config import OperatorSettings

    defaults = '{"priorityClassName": "training", "nodeSelector": {"a": "b"}}'
    monkeypatch.setenv("FINETUNE_OPERATOR_POD_DEFAULTS", defaults)
    monkeypatch.setenv("FINETUNE_OPERATOR_GPU_TOLERATION", "false")
    settings = OperatorSettings()
    assert settings.pod_defaults.priority_class_name == "training"
    assert settings.pod_defaults.node_selector == {"a": "b"}
    assert settings.gpu_toleration is False
