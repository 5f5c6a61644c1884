"""The chart through Helm's own engine, offline: lint, and what it renders for each combination of values."""

from __future__ import annotations

import json
from typing import Any

import helm_python as helm
import pytest

from finetune_operator.config import LABEL_SELECTOR, OperatorSettings
from tests.helm.chart import APPLICATION_RULES, CHART, flat_rules, render, render_notes

NAMESPACE = "finetune-system"
FULLNAME = "finetune-finetune-operator"


def lease_rules(name: str = FULLNAME) -> set[tuple]:
    return {
        ("coordination.k8s.io", "leases", ("create",), ()),
        ("coordination.k8s.io", "leases", ("get", "update"), (name,)),
    }


LEADER_ELECTION_ENV = {"FINETUNE_OPERATOR_LEADER_ELECTION_LEASE", "FINETUNE_OPERATOR_LEADER_ELECTION_NAMESPACE"}


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = of_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def env_of(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return {var["name"]: var.get("value", var.get("valueFrom")) for var in container(objects)["env"]}


VALUE_COMBINATIONS = {
    "default": {},
    "watch-namespaces": {"watchNamespaces": ["team-a", "team-b"]},
    "namespace-selector": {"watchNamespaceSelector": "finetune.dev/tenant=true"},
    "namespace-selector-elected": {"watchNamespaceSelector": "team in (a, b),!legacy", "replicaCount": 2},
    "no-rbac": {"rbac": {"create": False}},
    "no-crds": {"crds": {"enabled": False}},
    "two-replicas": {"replicaCount": 2},
    "two-replicas-namespaced": {"replicaCount": 2, "watchNamespaces": ["team-a"]},
    "everything-optional": {
        "image": {"digest": "sha256:" + "a" * 64},
        "priorityClassName": "system-cluster-critical",
        "imagePullSecrets": [{"name": "regcred"}],
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {}},
        "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}],
        "trainer": {
            "podDefaults": {
                "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
                "nodeSelector": {"karpenter.sh/nodepool": "gpu"},
                "priorityClassName": "training",
                "labels": {"cost-center": "ml"},
                "annotations": {"karpenter.sh/do-not-disrupt": "true"},
            },
            "metrics": {"port": 8000, "podMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
        },
        "networkPolicy": {"enabled": True, "workerNamespaces": ["ml"]},
    },
}


@pytest.mark.parametrize("values", VALUE_COMBINATIONS.values(), ids=VALUE_COMBINATIONS.keys())
def test_lint_is_clean(values):
    # As for the embedded cluster's Kubernetes version.
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version="v1.20.2")
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error
    assert not report["errors"] and not problems, report


@pytest.mark.parametrize("values", VALUE_COMBINATIONS.values(), ids=VALUE_COMBINATIONS.keys())
def test_every_object_has_the_standard_labels(values):
    for obj in render(values):
        labels = obj["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/name") == "finetune-operator", obj["metadata"]["name"]
        assert labels.get("app.kubernetes.io/instance") == "finetune", obj["metadata"]["name"]
        assert labels.get("app.kubernetes.io/managed-by") == "Helm", obj["metadata"]["name"]
        assert labels.get("app.kubernetes.io/version") and labels.get("helm.sh/chart"), obj["metadata"]["name"]


@pytest.mark.parametrize("values", VALUE_COMBINATIONS.values(), ids=VALUE_COMBINATIONS.keys())
def test_no_wildcards_anywhere_in_rbac(values):
    for role in of_kind(render(values), "ClusterRole") + of_kind(render(values), "Role"):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule


def test_default_is_cluster_wide_with_the_pinned_rules():
    objects = render()
    kinds = sorted(obj["kind"] for obj in objects)
    assert kinds == sorted(
        ["CustomResourceDefinition", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment", "Service"]
    )
    assert flat_rules(one(objects, "ClusterRole")) == APPLICATION_RULES
    binding = one(objects, "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": FULLNAME}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]
    assert one(objects, "ServiceAccount")["metadata"] == {
        **one(objects, "ServiceAccount")["metadata"],
        "name": FULLNAME,
        "namespace": NAMESPACE,
    }


def test_watch_namespaces_gives_a_role_per_namespace_and_nothing_cluster_wide():
    objects = render({"watchNamespaces": ["team-a", "team-b"]})
    assert not of_kind(objects, "ClusterRole") and not of_kind(objects, "ClusterRoleBinding")
    roles, bindings = of_kind(objects, "Role"), of_kind(objects, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for role in roles:
        assert flat_rules(role) == APPLICATION_RULES
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]
    assert env_of(objects)["FINETUNE_OPERATOR_WATCH_NAMESPACES"] == "team-a,team-b"


def test_namespace_selector_binds_the_rules_nowhere_and_only_namespace_reads_cluster_wide():
    """Tenants bind the ClusterRole in their namespaces (README's onboarding step): the chart binds it nowhere, so
    the operator holds no rights, ConfigMaps included, in a namespace that was not onboarded."""
    objects = render({"watchNamespaceSelector": "finetune.dev/tenant=true"})
    tenant_role, namespaces_role = sorted(of_kind(objects, "ClusterRole"), key=lambda r: r["metadata"]["name"])
    assert tenant_role["metadata"]["name"] == FULLNAME and flat_rules(tenant_role) == APPLICATION_RULES
    assert namespaces_role["metadata"]["name"] == f"{FULLNAME}-namespaces"
    assert flat_rules(namespaces_role) == {("", "namespaces", ("list", "watch"), ())}
    binding = one(objects, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == f"{FULLNAME}-namespaces", "the application rules are bound nowhere"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]
    assert not of_kind(objects, "Role") and not of_kind(objects, "RoleBinding")
    env = env_of(objects)
    assert env["FINETUNE_OPERATOR_WATCH_NAMESPACE_SELECTOR"] == "finetune.dev/tenant=true"
    assert env["FINETUNE_OPERATOR_WATCH_NAMESPACES"] == ""


def test_namespace_selector_with_leader_election_keeps_its_lease_role_in_the_release_namespace():
    objects = render({"watchNamespaceSelector": "finetune.dev/tenant=true", "replicaCount": 2})
    (role,) = of_kind(objects, "Role")
    assert role["metadata"]["namespace"] == NAMESPACE and flat_rules(role) == lease_rules()


def test_watch_namespaces_and_a_namespace_selector_are_exclusive():
    with pytest.raises(helm.HelmError, match="watchNamespaces and watchNamespaceSelector are both set"):
        render({"watchNamespaces": ["team-a"], "watchNamespaceSelector": "finetune.dev/tenant=true"})


@pytest.mark.parametrize("selector", ["tenant true", "=x", "team in a", "a,,b", "Example.com/x=y"])
def test_schema_refuses_a_bad_namespace_selector(selector):
    with pytest.raises(helm.HelmError, match="watchNamespaceSelector"):
        render({"watchNamespaceSelector": selector})


def test_the_schema_checks_selectors_with_the_operators_own_pattern():
    """One source: the operator's LABEL_SELECTOR is the schema's pattern, so both refuse the same selectors."""
    with CHART.joinpath("values.schema.json").open() as schema:
        pattern = json.load(schema)["properties"]["watchNamespaceSelector"]["pattern"]
    assert pattern == LABEL_SELECTOR.pattern


def test_notes_show_the_onboarding_of_a_tenant_namespace():
    notes = render_notes({"watchNamespaceSelector": "finetune.dev/tenant=true"})
    assert "the namespaces labelled finetune.dev/tenant=true" in notes
    assert "kubectl label namespace team-a finetune.dev/tenant=true" in notes
    assert (
        f"kubectl -n team-a create rolebinding {FULLNAME} --clusterrole={FULLNAME} "
        f"--serviceaccount={NAMESPACE}:{FULLNAME}"
    ) in notes
    assert "kubectl -n team-a apply -f - <<'YAML'" in notes
    assert "labels that match team in (a,b)" in render_notes({"watchNamespaceSelector": "team in (a,b)"})


def test_rbac_create_false_renders_no_rbac_but_the_service_account():
    objects = render({"rbac": {"create": False}})
    assert not [o for o in objects if o["kind"] in ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")]
    assert one(objects, "ServiceAccount")["metadata"]["name"] == FULLNAME


def test_an_existing_service_account_is_used_by_name():
    objects = render({"serviceAccount": {"create": False, "name": "platform-operator"}})
    assert not of_kind(objects, "ServiceAccount")
    assert one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "platform-operator"
    assert one(objects, "ClusterRoleBinding")["subjects"][0]["name"] == "platform-operator"


def test_crds_disabled_renders_no_crd_even_with_several_replicas():
    for values in ({"crds": {"enabled": False}}, {"crds": {"enabled": False}, "replicaCount": 3}):
        assert not of_kind(render(values), "CustomResourceDefinition")


@pytest.mark.parametrize("keep", [True, False])
def test_crds_keep_sets_the_resource_policy(keep):
    objects = render({"crds": {"enabled": True, "keep": keep}, "replicaCount": 2})
    crd = one(objects, "CustomResourceDefinition")  # the FineTuneJob CRD only: leases are built in
    assert crd["metadata"]["name"] == "finetunejobs.finetune.dev"
    assert (crd["metadata"].get("annotations", {}).get("helm.sh/resource-policy") == "keep") is keep


def test_argocd_never_prunes_the_crd():
    """ArgoCD ignores helm.sh/resource-policy: Prune=false is what keeps every FineTuneJob when an Application
    stops rendering the CRD. The repository's crds/ file carries it too, for Applications that apply it."""
    crd = one(render(), "CustomResourceDefinition")
    assert crd["metadata"]["annotations"]["argocd.argoproj.io/sync-options"] == "Prune=false"
    both = one(
        render({"crds": {"argocdSyncOptions": "Prune=false,ServerSideApply=true", "keep": False}}),
        "CustomResourceDefinition",
    )
    assert both["metadata"]["annotations"] == {"argocd.argoproj.io/sync-options": "Prune=false,ServerSideApply=true"}
    bare = one(render({"crds": {"argocdSyncOptions": "", "keep": False}}), "CustomResourceDefinition")
    assert "annotations" not in bare["metadata"]
    from finetune_operator.crd import build_crd

    assert build_crd()["metadata"]["annotations"] == {"argocd.argoproj.io/sync-options": "Prune=false"}
    with pytest.raises(helm.HelmError, match="argocdSyncOptions"):
        render({"crds": {"argocdSyncOptions": "Prune false"}})


def test_one_replica_runs_without_leader_election_and_never_overlaps():
    objects = render()
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert not LEADER_ELECTION_ENV & set(env_of(objects))
    assert not of_kind(objects, "Role") and not of_kind(objects, "RoleBinding")
    assert flat_rules(one(objects, "ClusterRole")) == APPLICATION_RULES


def test_zero_replicas_keep_everything_but_the_operator_pod():
    objects = render({"replicaCount": 0})
    assert one(objects, "Deployment")["spec"]["replicas"] == 0
    assert one(objects, "ClusterRole") and one(objects, "ServiceAccount") and one(objects, "CustomResourceDefinition")
    assert not LEADER_ELECTION_ENV & set(env_of(objects))


def assert_leader_election(objects: list[dict[str, Any]], lease: str = FULLNAME) -> None:
    """The lease env, and a Role in the release namespace with only the lease rules, bound to the operator."""
    env = env_of(objects)
    assert env["FINETUNE_OPERATOR_LEADER_ELECTION_LEASE"] == lease
    assert env["FINETUNE_OPERATOR_LEADER_ELECTION_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["POD_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    name = f"{FULLNAME}-leader-election"
    role = next(r for r in of_kind(objects, "Role") if r["metadata"]["name"] == name)
    assert role["metadata"]["namespace"] == NAMESPACE
    assert flat_rules(role) == lease_rules(lease)
    binding = next(b for b in of_kind(objects, "RoleBinding") if b["metadata"]["name"] == name)
    assert binding["metadata"]["namespace"] == NAMESPACE
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]


def test_two_replicas_turn_on_leader_election():
    objects = render({"replicaCount": 2})
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 2 and "strategy" not in deployment["spec"]  # a rolling update
    assert_leader_election(objects)
    assert flat_rules(one(objects, "ClusterRole")) == APPLICATION_RULES  # nothing cluster-wide about leases


def test_leader_election_with_one_replica_and_a_custom_lease_name():
    objects = render({"leaderElection": {"enabled": True, "leaseName": "ft-leader"}})
    assert one(objects, "Deployment")["spec"]["replicas"] == 1
    assert "strategy" not in one(objects, "Deployment")["spec"]
    assert_leader_election(objects, "ft-leader")


def test_leader_election_in_watched_namespaces_keeps_its_lease_in_the_release_namespace():
    objects = render({"replicaCount": 2, "watchNamespaces": ["team-a", NAMESPACE]})
    assert_leader_election(objects)
    for role in of_kind(objects, "Role"):
        if role["metadata"]["name"] == FULLNAME:
            assert flat_rules(role) == APPLICATION_RULES


def test_leader_election_without_rbac_creates_no_role():
    objects = render({"replicaCount": 2, "rbac": {"create": False}})
    assert env_of(objects)["FINETUNE_OPERATOR_LEADER_ELECTION_LEASE"] == FULLNAME
    assert not of_kind(objects, "Role") and not of_kind(objects, "RoleBinding")


def test_operator_pod_is_hardened():
    objects = render()
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container(objects)["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert {"name": "tmp", "mountPath": "/tmp"} in container(objects)["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}} in pod["volumes"]
    assert container(objects)["resources"]["limits"]["memory"]


def test_liveness_probe_and_named_ports():
    objects = render()
    ports = {port["name"]: port["containerPort"] for port in container(objects)["ports"]}
    assert ports == {"metrics": 8080, "health": 8081}
    probe = container(objects)["livenessProbe"]
    assert probe["httpGet"] == {"path": "/healthz", "port": "health"}
    service = one(objects, "Service")
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}]
    assert service["spec"]["selector"] == one(objects, "Deployment")["spec"]["selector"]["matchLabels"]


def test_metrics_disabled():
    objects = render({"metrics": {"enabled": False, "serviceMonitor": {"enabled": True}}})
    assert not of_kind(objects, "Service") and not of_kind(objects, "ServiceMonitor")
    assert env_of(objects)["FINETUNE_OPERATOR_METRICS_PORT"] == "0"
    assert [port["name"] for port in container(objects)["ports"]] == ["health"]


def test_service_monitor_scrapes_the_metrics_port():
    objects = render({"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}})
    monitor = one(objects, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["selector"]["matchLabels"] == one(objects, "Service")["spec"]["selector"]


@pytest.mark.parametrize("values", VALUE_COMBINATIONS.values(), ids=VALUE_COMBINATIONS.keys())
def test_env_sets_every_operator_setting_and_parses(values, monkeypatch):
    """The Deployment's env mirrors OperatorSettings: every field set, and the operator reads it back."""
    objects = render(values)
    env = {name: value for name, value in env_of(objects).items() if isinstance(value, str)}
    expected = {f"FINETUNE_OPERATOR_{field.upper()}" for field in OperatorSettings.model_fields}
    elected = values.get("replicaCount", 1) > 1
    # the lease's namespace comes from the downward API (a valueFrom, not a plain value)
    assert {name for name in env if name.startswith("FINETUNE_OPERATOR_")} == (
        expected - {"FINETUNE_OPERATOR_LEADER_ELECTION_NAMESPACE"} if elected else expected - LEADER_ELECTION_ENV
    )
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if elected:
        monkeypatch.setenv("FINETUNE_OPERATOR_LEADER_ELECTION_NAMESPACE", NAMESPACE)  # as the kubelet sets it
    settings = OperatorSettings()
    assert settings.watch_namespaces == values.get("watchNamespaces", [])
    assert settings.watch_namespace_selector == (values.get("watchNamespaceSelector") or None)
    assert settings.trainer_image == "ghcr.io/finetune-operator/trainer:0.1.0"
    assert settings.leader_election_lease == (FULLNAME if elected else None)
    assert not elected or settings.leader_election_namespace == NAMESPACE
    assert (settings.metrics_port, settings.health_port) == (8080, 8081)


def test_images_default_to_the_app_version_and_accept_digests():
    assert container(render())["image"] == "ghcr.io/finetune-operator/operator:0.1.0"
    digest = "sha256:" + "b" * 64
    objects = render({"image": {"tag": "dev"}, "trainer": {"image": {"repository": "r.example/t", "digest": digest}}})
    assert container(objects)["image"] == "ghcr.io/finetune-operator/operator:dev"
    assert env_of(objects)["FINETUNE_OPERATOR_TRAINER_IMAGE"] == f"r.example/t@{digest}"


def test_the_operator_command_is_explicit():
    assert container(render())["command"] == ["finetune", "operator"]


BAD_VALUES = {
    "replicaCount": {"replicaCount": -1},
    "replicaCount-string": {"replicaCount": "2"},
    "logLevel": {"logLevel": "verbose"},
    "watchNamespaces": {"watchNamespaces": ["Team_A"]},
    "watchNamespaces-duplicate": {"watchNamespaces": ["a", "a"]},
    "replicas": {"replicas": 2},  # a typo of replicaCount: unknown keys fail instead of being ignored
    "pullPolicy": {"image": {"pullPolicy": "Sometimes"}},
    "port": {"metrics": {"port": 70000}},
    "create": {"rbac": {"create": "yes"}},
    "name": {"serviceAccount": {"create": False, "name": ""}},
    "terminationGracePeriodSeconds": {"trainer": {"terminationGracePeriodSeconds": 0}},
    "keep": {"crds": {"keep": "true"}},
    "digest": {"image": {"digest": "latest"}},
}


@pytest.mark.parametrize("values", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_schema_refuses_bad_values_naming_the_key(values, request):
    key = request.node.callspec.id.split("-")[0]
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError, match=key):
        chart.validate_schema(values)
    with pytest.raises(helm.HelmError, match=key):  # what `helm install` and `helm template` run first
        render(values)


def test_defaults_satisfy_the_schema():
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema({})
        chart.validate_schema(VALUE_COMBINATIONS["everything-optional"])


def test_extra_env_cannot_override_settings():
    with pytest.raises(helm.HelmError, match="extraEnv sets FINETUNE_OPERATOR_LOG_LEVEL"):
        render({"extraEnv": [{"name": "FINETUNE_OPERATOR_LOG_LEVEL", "value": "DEBUG"}]})


def test_clashing_ports_are_refused():
    with pytest.raises(helm.HelmError, match="different ports"):
        render({"metrics": {"port": 9000}, "healthProbe": {"port": 9000}})


def test_notes_show_the_first_job_and_how_to_watch_it():
    notes = render_notes()
    assert "kubectl -n default apply -f - <<'YAML'" in notes
    assert "kind: FineTuneJob" in notes and "kubectl -n default get ftj -w" in notes
    watched = render_notes({"watchNamespaces": ["ml"]})
    assert "kubectl -n ml apply -f" in watched and "kubectl -n ml get ftj -w" in watched
    assert "install it first" in render_notes({"crds": {"enabled": False}})
    assert "elect a leader with Lease finetune-system/finetune-finetune-operator" in render_notes({"replicaCount": 2})


def test_operator_pod_is_restricted():
    from tests.pod_security import violations

    for values in VALUE_COMBINATIONS.values():
        pod = one(render(values), "Deployment")["spec"]["template"]["spec"]
        assert violations(pod, "restricted") == [], values


def test_readiness_probe_on_healthz():
    assert container(render())["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}


def test_trainer_settings_reach_the_operator(monkeypatch):
    values = {
        "trainer": {
            "imagePullSecrets": [{"name": "regcred"}, {"name": "mirror"}],
            "resources": {"cpuPerGpu": "12", "memoryPerGpu": ""},
            "modelCacheSize": "200Gi",
        },
        "gangScheduling": {"schedulerName": "coscheduler"},
    }
    for name, value in env_of(render(values)).items():
        if isinstance(value, str):
            monkeypatch.setenv(name, value)
    settings = OperatorSettings()
    assert settings.image_pull_secrets == ["regcred", "mirror"]
    assert (settings.cpu_per_gpu, settings.memory_per_gpu) == ("12", None)
    assert (settings.model_cache_size, settings.shm_size, settings.tmp_size) == ("200Gi", "16Gi", "10Gi")
    assert settings.gang_scheduler_name == "coscheduler"


@pytest.mark.parametrize("values", [{"trainer": {"shmSize": "lots"}}, {"trainer": {"resources": {"cpuPerGpu": 4}}}])
def test_schema_refuses_bad_worker_sizes(values):
    with pytest.raises(helm.HelmError):
        render(values)


def test_network_policies_let_a_gang_talk_to_itself_and_to_the_api_server():
    assert not of_kind(render(), "NetworkPolicy")
    objects = render(
        {
            "networkPolicy": {
                "enabled": True,
                "workerNamespaces": ["ml", "research"],
                "apiServer": {"cidrs": ["10.0.0.10/32"], "ports": [6443]},
                "workerEgress": [],
            }
        }
    )
    policies = {
        (p["metadata"]["namespace"], p["metadata"]["name"]): p["spec"] for p in of_kind(objects, "NetworkPolicy")
    }
    operator = policies[(NAMESPACE, FULLNAME)]
    assert operator["podSelector"]["matchLabels"] == one(objects, "Deployment")["spec"]["selector"]["matchLabels"]
    api_server = {"ports": [{"port": 6443, "protocol": "TCP"}], "to": [{"ipBlock": {"cidr": "10.0.0.10/32"}}]}
    assert api_server in operator["egress"]
    workers = {"finetune.dev/role": "worker", "app.kubernetes.io/managed-by": "finetune-operator"}
    for namespace in ("ml", "research"):
        policy = policies[(namespace, f"{FULLNAME}-workers")]
        assert policy["podSelector"]["matchLabels"] == workers
        assert policy["ingress"][0] == {"from": [{"podSelector": {"matchLabels": workers}}]}, "all ports, the gang"
        assert policy["ingress"][1]["ports"] == [{"port": "metrics", "protocol": "TCP"}], "Prometheus: metrics only"
        assert {"to": [{"podSelector": {"matchLabels": workers}}]} in policy["egress"]
        assert api_server in policy["egress"]
        assert len(policy["egress"]) == 3  # the gang, the API server, DNS: workerEgress was emptied
    watched = render({"networkPolicy": {"enabled": True}, "watchNamespaces": ["team-a"]})
    assert [p["metadata"]["namespace"] for p in of_kind(watched, "NetworkPolicy")] == [NAMESPACE, "team-a"]


# --- platform defaults of worker pods, as the chart hands them to the operator (issue 22) -----------------

EXAMPLES = sorted((CHART.parents[1] / "examples").glob("*.yaml"))
PLATFORM_DEFAULTS = {
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
    "nodeSelector": {"karpenter.sh/nodepool": "gpu"},
    "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
    "priorityClassName": "training",
    "labels": {"cost-center": "ml"},
    "annotations": {"karpenter.sh/do-not-disrupt": "true"},
}


def settings_of(objects: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> OperatorSettings:
    """The settings the rendered operator reads from its env."""
    for name, value in env_of(objects).items():
        if isinstance(value, str):
            monkeypatch.setenv(name, value)
    return OperatorSettings()


def workers_of_examples(settings: OperatorSettings) -> dict[str, list[dict[str, Any]]]:
    """Every example job's worker pods as the operator with `settings` builds them."""
    import yaml

    from finetune_operator.api import FineTuneJob
    from finetune_operator.builders import build_gang

    gangs = {}
    for path in EXAMPLES:
        body = yaml.safe_load(path.read_text())
        body["metadata"] |= {"namespace": "ml", "uid": "uid-1"}
        gangs[path.name] = build_gang(FineTuneJob.model_validate(body), attempt=0, settings=settings)
    return gangs


def test_pod_defaults_reach_every_worker_under_the_jobs_own_template(monkeypatch):
    settings = settings_of(render({"trainer": {"podDefaults": PLATFORM_DEFAULTS}}), monkeypatch)
    gangs = workers_of_examples(settings)
    assert len(gangs) >= 4
    for name, gang in gangs.items():
        for pod in gang:
            spec, metadata = pod["spec"], pod["metadata"]
            assert PLATFORM_DEFAULTS["tolerations"][0] in spec["tolerations"], name
            assert spec["affinity"]["podAntiAffinity"] == PLATFORM_DEFAULTS["affinity"]["podAntiAffinity"], name
            assert spec["priorityClassName"] == "training", name
            assert metadata["labels"]["cost-center"] == "ml", name
            assert metadata["annotations"]["karpenter.sh/do-not-disrupt"] == "true", name
            gpus = int(spec["containers"][0]["resources"].get("limits", {}).get("nvidia.com/gpu", 0))
            gpu_toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            assert any(t.get("key") == "nvidia.com/gpu" for t in spec["tolerations"]) == (gpus > 0), name
            assert gpus == 0 or gpu_toleration in spec["tolerations"], name
    # A job's own nodeSelector keys win over the chart's; the others stay.
    own = {p["metadata"]["name"]: p for p in gangs["llama-alpaca-lora.yaml"]}["llama-alpaca-worker-0"]
    assert own["spec"]["nodeSelector"]["karpenter.sh/nodepool"] == "gpu"


def test_gpu_toleration_is_an_opt_out(monkeypatch):
    settings = settings_of(render({"trainer": {"gpuToleration": False}}), monkeypatch)
    assert settings.gpu_toleration is False and settings.pod_defaults.tolerations == []


def test_empty_pod_defaults_reach_the_operator_as_an_empty_object():
    assert env_of(render())["FINETUNE_OPERATOR_POD_DEFAULTS"] == "{}"


def test_no_default_pod_requests_ephemeral_storage(monkeypatch):
    """Stock EKS nodes have 20 GiB of root disk: a default request for the model cache made workers
    Unschedulable there, and it counted against Kueue quotas."""
    settings = settings_of(render(), monkeypatch)
    assert settings.model_cache_size is None
    sized_by_the_job = {"gang-scheduled.yaml"}  # spec.storage.modelCache.sizeLimit: 100Gi, its own choice
    for name, gang in workers_of_examples(settings).items():
        for pod in gang:
            requests = str(pod["spec"]["containers"][0].get("resources"))
            assert ("ephemeral-storage" in requests) == (name in sized_by_the_job), name
            cache = next(v for v in pod["spec"]["volumes"] if v["name"] == "model-cache")
            assert cache == {"name": "model-cache", "emptyDir": {}} or name in sized_by_the_job, name


POD_DEFAULTS_REFUSED = {
    "tolerations-without-key-must-be-exists": {"tolerations": [{"operator": "Equal", "value": "x"}]},
    "tolerations-exists-takes-no-value": {"tolerations": [{"key": "a", "operator": "Exists", "value": "x"}]},
    "tolerations-seconds-need-no-execute": {
        "tolerations": [{"key": "a", "effect": "NoSchedule", "tolerationSeconds": 5}]
    },
    "tolerations-bad-effect": {"tolerations": [{"key": "a", "effect": "NoScheduled"}]},
    "priorityClassName-upper-case": {"priorityClassName": "High"},
    "nodeSelector-bad-value": {"nodeSelector": {"pool": "a b"}},
    "labels-bad-key": {"labels": {"-team": "x"}},
    "podDefaults-unknown-field": {"schedulerName": "x"},
}


@pytest.mark.parametrize("defaults", POD_DEFAULTS_REFUSED.values(), ids=POD_DEFAULTS_REFUSED.keys())
def test_schema_refuses_pod_defaults_the_api_server_would(defaults, request):
    key = request.node.callspec.id.split("-")[0]
    with pytest.raises(helm.HelmError, match=key):
        render({"trainer": {"podDefaults": defaults}})


def test_schema_takes_the_tolerations_the_api_server_takes():
    tolerations = [
        {"operator": "Exists"},
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 30},
        {"key": "dedicated", "value": "ml"},
    ]
    render({"trainer": {"podDefaults": {"tolerations": tolerations, "priorityClassName": "system-cluster-critical"}}})


# --- trainer metrics: on by default, a PodMonitor, the monitoring namespace admitted (issue 22) -----------


def test_trainer_metrics_are_on_by_default_on_a_named_port(monkeypatch):
    settings = settings_of(render(), monkeypatch)
    assert settings.trainer_metrics_port == 8000
    for gang in workers_of_examples(settings).values():
        trainer = gang[0]["spec"]["containers"][0]
        assert {"name": "metrics", "containerPort": 8000, "protocol": "TCP"} in trainer["ports"]
        assert {"name": "FINETUNE_METRICS_PORT", "value": "8000"} in trainer["env"]


def test_trainer_metrics_off(monkeypatch):
    settings = settings_of(render({"trainer": {"metrics": {"port": 0}}}), monkeypatch)
    trainer = workers_of_examples(settings)["demo-job.yaml"][0]["spec"]["containers"][0]
    assert [port["name"] for port in trainer["ports"]] == ["rendezvous"]
    assert "FINETUNE_METRICS_PORT" not in str(trainer["env"])


def test_pod_monitor_scrapes_rank_0_of_every_job_where_the_operator_serves():
    assert not of_kind(render(), "PodMonitor"), "opt-in, like the ServiceMonitor"
    on = {"trainer": {"metrics": {"port": 8000, "podMonitor": {"enabled": True, "labels": {"release": "prom"}}}}}
    monitor = one(render(on), "PodMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    assert monitor["spec"]["selector"]["matchLabels"]["finetune.dev/rank"] == "0"
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    watched = one(render({**on, "watchNamespaces": ["ml"]}), "PodMonitor")
    assert watched["spec"]["namespaceSelector"] == {"matchNames": ["ml"]}


def test_network_policy_admits_the_monitoring_namespace_to_the_workers_metrics():
    objects = render({"networkPolicy": {"enabled": True, "workerNamespaces": ["ml"]}})
    workers = next(p for p in of_kind(objects, "NetworkPolicy") if p["metadata"]["namespace"] == "ml")
    scrape = {
        "from": [
            {
                "namespaceSelector": {
                    "matchExpressions": [
                        {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["monitoring"]}
                    ]
                }
            }
        ],
        "ports": [{"port": "metrics", "protocol": "TCP"}],
    }
    assert scrape in workers["spec"]["ingress"]
    closed = render({"networkPolicy": {"enabled": True, "workerNamespaces": ["ml"], "monitoringNamespaces": []}})
    workers = next(p for p in of_kind(closed, "NetworkPolicy") if p["metadata"]["namespace"] == "ml")
    assert len(workers["spec"]["ingress"]) == 1, "the gang only"
