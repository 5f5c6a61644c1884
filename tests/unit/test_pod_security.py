"""Every pod the operator creates by default meets the PodSecurity "restricted" profile; the README's list of
user additions that move a job to "baseline" or "privileged" holds."""

import pytest

from finetune_operator.builders import build_gang
from finetune_operator.config import OperatorSettings
from tests.pod_security import level, violations

DEFAULT_JOBS = {
    "cpu-emptydir": {"gpusPerWorker": 0},
    "gpu-claim": {"gpusPerWorker": 8, "storage": {"persistentVolumeClaim": {"claimName": "runs"}}},
    "model-cache-claim": {
        "storage": {"emptyDir": {}, "modelCache": {"persistentVolumeClaim": {"claimName": "hf"}}},
    },
    "gang-and-template": {
        "gangScheduling": {},
        "template": {
            "imagePullSecrets": [{"name": "regcred"}],
            "initContainers": [{"name": "fetch", "image": "busybox"}],
            "sidecars": [{"name": "shipper", "image": "fluent-bit"}],
            "envFrom": [{"secretRef": {"name": "hf-token"}}],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "datasets", "readOnly": True}}],
            "volumeMounts": [{"name": "data", "mountPath": "/data", "readOnly": True}],
        },
    },
}
CHART_SETTINGS = OperatorSettings(cpu_per_gpu="4", memory_per_gpu="32Gi", model_cache_size="50Gi")


@pytest.mark.parametrize("spec", DEFAULT_JOBS.values(), ids=DEFAULT_JOBS.keys())
def test_worker_pods_are_restricted(make_job, spec):
    for pod in build_gang(make_job(workers=2, **spec), attempt=0, settings=CHART_SETTINGS):
        assert violations(pod["spec"], "restricted") == [], pod["metadata"]["name"]


@pytest.mark.parametrize(
    ("template", "expected", "named"),
    [
        ({"capabilities": ["NET_BIND_SERVICE"]}, "restricted", None),
        ({"capabilities": ["CHOWN"]}, "baseline", "capabilities.add CHOWN"),
        ({"capabilities": ["IPC_LOCK"]}, "privileged", "capabilities.add IPC_LOCK"),
        ({"sidecars": [{"name": "s", "image": "i", "securityContext": {"runAsNonRoot": False}}]}, "baseline", None),
        ({"sidecars": [{"name": "s", "image": "i", "securityContext": {"privileged": True}}]}, "privileged", None),
        (
            {
                "volumes": [{"name": "nvme", "hostPath": {"path": "/mnt/nvme"}}],
                "volumeMounts": [{"name": "nvme", "mountPath": "/nvme"}],
            },
            "privileged",
            "hostPath",
        ),
    ],
)
def test_user_additions_that_change_the_profile(make_job, settings, template, expected, named):
    pod = build_gang(make_job(template=template), 0, settings)[0]
    assert level(pod["spec"]) == expected
    if named:
        assert any(named in problem for problem in violations(pod["spec"], "restricted"))


def test_the_checker_catches_what_restricted_forbids():
    """The rules themselves: a pod with nothing set is baseline, not restricted."""
    bare = {"containers": [{"name": "c", "image": "i"}]}
    assert level(bare) == "baseline"
    assert len(violations(bare, "restricted")) == 4  # escalation, non-root, seccomp, drop ALL
    assert level({**bare, "hostNetwork": True}) == "privileged"
