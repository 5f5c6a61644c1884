"""The chart installed by Helm's engine into the embedded cluster, and what its ServiceAccount may do.

The operator's credentials in these tests are what a pod of the chart would get: a token from the
TokenRequest API for the chart's ServiceAccount, and nothing else.
"""

from __future__ import annotations

import re
import urllib.request

import helm_python as helm
import kubernetes
import pytest
import yaml
from kubernetes.client import ApiException

from finetune_dev.chart_sync import CRD_SOURCE
from finetune_dev.harness import Jobs, OperatorProcess, free_port, install_crd, job_manifest, kubectl, wait_for
from finetune_operator.api import FineTuneJob
from finetune_operator.builders import build_progress_role, build_progress_role_binding
from tests.helm.chart import (
    APPLICATION_RULES,
    REPO,
    flat_rules,
    kubeconfig_for_token,
    render_notes,
    service_account_token,
    token_api_client,
)

pytestmark = pytest.mark.integration

FORBIDDEN = 403


def can(
    client: kubernetes.client.ApiClient,
    verb: str,
    resource: str,
    namespace: str | None = None,
    group: str = "",
    subresource: str | None = None,
    name: str | None = None,
) -> bool:
    """Whether the client's user may `verb` the resource, asked of the API server (kubectl auth can-i)."""
    review = kubernetes.client.V1SelfSubjectAccessReview(
        spec=kubernetes.client.V1SelfSubjectAccessReviewSpec(
            resource_attributes=kubernetes.client.V1ResourceAttributes(
                verb=verb, resource=resource, namespace=namespace, group=group, subresource=subresource, name=name
            )
        )
    )
    return kubernetes.client.AuthorizationV1Api(client).create_self_subject_access_review(review).status.allowed


def forbidden(call) -> bool:
    try:
        call()
    except ApiException as e:
        return e.status == FORBIDDEN
    return False


def a_job(kube, namespace: str, name: str = "probe") -> FineTuneJob:
    """A FineTuneJob created by the admin, so that the operator's objects can point their owner at it
    (the garbage collector deletes objects whose owner does not exist)."""
    install_crd(kube.api_client())
    return FineTuneJob.model_validate(Jobs(kube.api_client(), namespace).create(job_manifest(name)))


# (verb, group, resource, subresource): what the operator does, per namespace it serves.
NEEDED = [
    ("create", "", "events", None),
    ("get", "finetune.dev", "finetunejobs", None),
    ("list", "finetune.dev", "finetunejobs", None),
    ("watch", "finetune.dev", "finetunejobs", None),
    ("delete", "finetune.dev", "finetunejobs", None),
    ("patch", "finetune.dev", "finetunejobs", "status"),
    ("update", "finetune.dev", "finetunejobs", "finalizers"),
    ("list", "", "pods", None),
    ("watch", "", "pods", None),
    ("create", "", "pods", None),
    ("delete", "", "pods", None),
    ("create", "", "services", None),
    ("create", "", "serviceaccounts", None),
    ("create", "", "configmaps", None),
    ("list", "", "configmaps", None),
    ("watch", "", "configmaps", None),
    ("create", "rbac.authorization.k8s.io", "roles", None),
    ("create", "rbac.authorization.k8s.io", "rolebindings", None),
    # A create that finds the name taken reads the owner, and replaces what a deleted job of that name left.
    *(
        (verb, group, resource, None)
        for verb in ("get", "delete")
        for group, resource in [
            ("", "services"),
            ("", "serviceaccounts"),
            ("", "configmaps"),
            ("rbac.authorization.k8s.io", "roles"),
            ("rbac.authorization.k8s.io", "rolebindings"),
        ]
    ),
]
# What it must not do: read credentials, change what it did not create, act outside its list.
NOT_NEEDED = [
    ("get", "", "secrets", None),
    ("list", "", "secrets", None),
    ("watch", "", "secrets", None),
    ("create", "", "serviceaccounts", "token"),  # minting tokens of other accounts
    ("create", "", "pods", "exec"),
    ("get", "", "pods", "log"),
    ("patch", "", "pods", None),
    ("update", "", "pods", None),
    ("deletecollection", "", "pods", None),
    ("update", "", "configmaps", None),
    ("patch", "", "services", None),
    ("patch", "", "serviceaccounts", None),
    ("create", "finetune.dev", "finetunejobs", None),
    ("patch", "finetune.dev", "finetunejobs", None),
    ("update", "finetune.dev", "finetunejobs", None),
    ("update", "finetune.dev", "finetunejobs", "status"),
    ("patch", "rbac.authorization.k8s.io", "roles", None),
    ("bind", "rbac.authorization.k8s.io", "roles", None),
    ("escalate", "rbac.authorization.k8s.io", "roles", None),
    ("create", "", "persistentvolumeclaims", None),
    ("create", "apps", "deployments", None),
    ("get", "", "events", None),
]
CLUSTER_SCOPED_NOT_NEEDED = [
    ("create", "rbac.authorization.k8s.io", "clusterroles"),
    ("create", "rbac.authorization.k8s.io", "clusterrolebindings"),
    ("create", "", "namespaces"),
    ("list", "", "nodes"),
    ("create", "apiextensions.k8s.io", "customresourcedefinitions"),
    ("list", "", "secrets"),
]


def test_chart_installs_upgrades_and_keeps_the_crd(kube, release):
    summary = release.install()
    assert summary["status"] == "deployed"
    admin = kube.api_client()
    extensions = kubernetes.client.ApiextensionsV1Api(admin)
    crd = extensions.read_custom_resource_definition("finetunejobs.finetune.dev")
    assert crd.metadata.labels["app.kubernetes.io/instance"] == release.name
    assert crd.metadata.annotations["helm.sh/resource-policy"] == "keep"
    assert crd.metadata.annotations["argocd.argoproj.io/sync-options"] == "Prune=false", "Argo CD never prunes it"
    source = yaml.safe_load(CRD_SOURCE.read_text())
    served = admin.sanitize_for_serialization(crd)["spec"]
    assert served["versions"][0]["schema"] == source["spec"]["versions"][0]["schema"]
    rbac = kubernetes.client.RbacAuthorizationV1Api(admin)
    role = admin.sanitize_for_serialization(rbac.read_cluster_role(f"{release.name}-finetune-operator"))
    assert flat_rules(role) == APPLICATION_RULES

    upgraded = release.install({"logLevel": "DEBUG"})
    assert upgraded["revision"] == 2
    deployment = kubernetes.client.AppsV1Api(admin).read_namespaced_deployment(
        f"{release.name}-finetune-operator", release.namespace
    )
    env = {e.name: e.value for e in deployment.spec.template.spec.containers[0].env}
    assert env["FINETUNE_OPERATOR_LOG_LEVEL"] == "DEBUG"

    release.uninstall()
    assert extensions.read_custom_resource_definition("finetunejobs.finetune.dev")  # kept: jobs survive
    with pytest.raises(ApiException) as gone:
        rbac.read_cluster_role(f"{release.name}-finetune-operator")
    assert gone.value.status == 404


def test_pod_defaults_the_api_server_would_refuse_fail_the_install(kube, release):
    """Caught by values.schema.json at `helm install`, not by every job's pods at runtime (issue 22)."""
    bad_toleration = {"trainer": {"podDefaults": {"tolerations": [{"operator": "Equal", "value": "gpu"}]}}}
    with pytest.raises(helm.HelmError, match="tolerations"):
        release.install(bad_toleration)
    with pytest.raises(helm.HelmError, match="priorityClassName"):
        release.install({"trainer": {"podDefaults": {"priorityClassName": "High_Priority"}}})
    assert release.install({"trainer": {"podDefaults": {"tolerations": [{"operator": "Exists"}]}}})["status"] == (
        "deployed"
    )


def test_operator_account_can_do_what_the_operator_needs_and_no_more(kube, release, namespace, tmp_path):
    release.install({"crds": {"enabled": False}})
    operator = release.operator_client(tmp_path)
    for verb, group, resource, subresource in NEEDED:
        assert can(operator, verb, resource, namespace, group, subresource), (verb, resource, subresource)
        assert can(operator, verb, resource, "some-other-team", group, subresource), "cluster-wide by default"
    for verb, group, resource, subresource in NOT_NEEDED:
        assert not can(operator, verb, resource, namespace, group, subresource), (verb, resource, subresource)
    for verb, group, resource in CLUSTER_SCOPED_NOT_NEEDED:
        assert not can(operator, verb, resource, None, group), (verb, resource)


def test_operator_account_cannot_read_secrets_for_real(kube, release, namespace, tmp_path):
    release.install({"crds": {"enabled": False}})
    admin = kubernetes.client.CoreV1Api(kube.api_client())
    admin.create_namespaced_secret(namespace, {"metadata": {"name": "hf-token"}, "stringData": {"HF_TOKEN": "x"}})
    core = kubernetes.client.CoreV1Api(release.operator_client(tmp_path))
    assert forbidden(lambda: core.read_namespaced_secret("hf-token", namespace))
    assert forbidden(lambda: core.list_namespaced_secret(namespace))
    assert forbidden(lambda: core.list_secret_for_all_namespaces())
    assert forbidden(lambda: core.list_namespaced_secret("kube-system"))
    assert forbidden(
        lambda: core.create_namespaced_service_account_token("default", namespace, {"spec": {"audiences": []}})
    )


def test_operator_account_writes_only_what_it_creates(kube, release, namespace, tmp_path):
    release.install({"crds": {"enabled": False}})
    client = release.operator_client(tmp_path)
    core, rbac = kubernetes.client.CoreV1Api(client), kubernetes.client.RbacAuthorizationV1Api(client)
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "probe-progress"}})
    assert forbidden(
        lambda: core.replace_namespaced_config_map(
            "probe-progress", namespace, {"metadata": {"name": "probe-progress"}}
        )
    )
    claim = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}
    assert forbidden(
        lambda: core.create_namespaced_persistent_volume_claim(namespace, {"metadata": {"name": "p"}, "spec": claim})
    )
    assert forbidden(
        lambda: kubernetes.client.AppsV1Api(client).create_namespaced_deployment(
            namespace,
            {
                "metadata": {"name": "d"},
                "spec": {
                    "selector": {"matchLabels": {"a": "b"}},
                    "template": {
                        "metadata": {"labels": {"a": "b"}},
                        "spec": {"containers": [{"name": "c", "image": "x"}]},
                    },
                },
            },
        )
    )
    # The trainer's Role and RoleBinding exactly as the operator builds them: RBAC lets them through
    # only because the operator holds get and patch on ConfigMaps itself.
    job = a_job(kube, namespace)
    rbac.create_namespaced_role(namespace, build_progress_role(job))
    rbac.create_namespaced_role_binding(namespace, build_progress_role_binding(job))
    # ... and it cannot grant what it does not hold.
    wider = build_progress_role(job) | {"rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]}
    wider["metadata"] = {"name": "wider", "namespace": namespace}
    assert forbidden(lambda: rbac.create_namespaced_role(namespace, wider))
    assert forbidden(lambda: rbac.create_cluster_role({"metadata": {"name": f"{namespace}-x"}, "rules": []}))


def test_without_configmap_patch_the_trainer_role_cannot_be_created(kube, namespace, tmp_path):
    """Why the chart grants ConfigMap patch: Kubernetes refuses to let anyone grant what they do not hold."""
    admin = kube.api_client()
    core, rbac = kubernetes.client.CoreV1Api(admin), kubernetes.client.RbacAuthorizationV1Api(admin)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "no-patch"}})
    rules = [
        {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles"], "verbs": ["create"]},
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch", "create"]},
    ]
    rbac.create_namespaced_role(namespace, {"metadata": {"name": "no-patch"}, "rules": rules})
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "no-patch"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "no-patch"},
            "subjects": [{"kind": "ServiceAccount", "name": "no-patch", "namespace": namespace}],
        },
    )
    token = service_account_token(admin, namespace, "no-patch")
    client = token_api_client(kubeconfig_for_token(kube.kubeconfig, token, tmp_path / "no-patch"))
    trainer_role = build_progress_role(a_job(kube, namespace))
    with pytest.raises(ApiException) as refused:
        kubernetes.client.RbacAuthorizationV1Api(client).create_namespaced_role(namespace, trainer_role)
    assert refused.value.status == FORBIDDEN and "not currently held" in refused.value.body


def test_watch_namespaces_confine_the_operator_to_them(kube, release, extra_namespaces, tmp_path):
    watched = extra_namespaces
    release.install({"crds": {"enabled": False}, "watchNamespaces": watched, "replicaCount": 0})
    operator = release.operator_client(tmp_path)
    for namespace in watched:
        for verb, group, resource, subresource in NEEDED:
            assert can(operator, verb, resource, namespace, group, subresource), (namespace, verb, resource)
    for verb, group, resource, subresource in NEEDED:
        assert not can(operator, verb, resource, release.namespace, group, subresource), (verb, resource)
        assert not can(operator, verb, resource, "some-other-team", group, subresource), (verb, resource)
        assert not can(operator, verb, resource, None, group, subresource), ("cluster-wide", verb, resource)
    rbac = kubernetes.client.RbacAuthorizationV1Api(kube.api_client())
    assert not rbac.list_cluster_role(label_selector=f"app.kubernetes.io/instance={release.name}").items


def test_the_operator_may_create_get_and_update_its_lease_and_no_other(kube, release, tmp_path):
    release.install({"replicaCount": 0, "leaderElection": {"enabled": True}})
    operator = release.operator_client(tmp_path)
    lease = f"{release.name}-finetune-operator"
    group, namespace = "coordination.k8s.io", release.namespace
    assert can(operator, "create", "leases", namespace, group)
    for verb in ("get", "update"):
        assert can(operator, verb, "leases", namespace, group, name=lease), verb
        assert not can(operator, verb, "leases", namespace, group, name="someone-elses"), verb
        assert not can(operator, verb, "leases", "kube-system", group, name=lease), verb
    assert not can(operator, "create", "leases", "kube-system", group)
    for verb in ("list", "watch", "patch", "delete"):
        assert not can(operator, verb, "leases", namespace, group, name=lease), verb


def drive_job_through_its_life(jobs: Jobs, name: str) -> None:
    """Gang, a failed worker and the gang restart, success, and deletion after ttlSecondsAfterFinished."""
    jobs.start_running(name, gpusPerWorker=0, ttlSecondsAfterFinished=0)
    jobs.finish_pod(f"{name}-worker-1", 137, reason="OOMKilled")  # the whole gang is deleted and recreated
    second = jobs.wait_pods(name, 2, attempt=1)
    for pod in second:
        jobs.run_pod(pod.metadata.name)
    jobs.wait_phase(name, "Running")
    wait_for(lambda: [e for e in jobs.events(name) if e.reason == "WorkerFailed"], 30, what="an Event")
    wait_for(lambda: jobs.core.read_namespaced_config_map(f"{name}-progress", jobs.namespace), 30, what="progress")
    for pod in second:
        jobs.finish_pod(pod.metadata.name, 0, reason="Completed")
    wait_for(lambda: jobs.get(name) is None, 60, what="the TTL to delete the finished job")


# How the API server words an RBAC denial (not e.g. a 403 for creating in a terminating namespace).
RBAC_DENIAL = re.compile(r'is forbidden: User "[^"]+" cannot')


def assert_never_forbidden(log: str) -> None:
    refused = [line for line in log.splitlines() if RBAC_DENIAL.search(line)]
    assert not refused, "\n".join(refused[:5])


@pytest.mark.parametrize("scope", ["cluster-wide", "watch-namespaces"])
def test_operator_runs_a_job_through_its_life_on_the_chart_rbac_alone(kube, release, namespace, tmp_path, scope):
    """The real operator process with only the chart's token: gang, restart, success, TTL; no Forbidden."""
    install_crd(kube.api_client())
    watched = [namespace] if scope == "watch-namespaces" else []
    release.install({"crds": {"enabled": False}, "watchNamespaces": watched, "replicaCount": 0})
    operator = OperatorProcess(
        str(release.operator_kubeconfig(tmp_path)),
        tmp_path / "operator.log",
        {"FINETUNE_OPERATOR_WATCH_NAMESPACES": ",".join(watched)},
    )
    operator.start()
    try:
        drive_job_through_its_life(Jobs(kube.api_client(), namespace), "life")
    finally:
        operator.stop()
    assert_never_forbidden(operator.log())


def test_with_two_replicas_one_reconciles_and_the_other_stands_by(kube, release, namespace, tmp_path):
    """Two identical operator processes, as the Deployment's two pods run them: the Lease's holder runs, the
    other runs nothing until the holder stops, then takes over."""
    install_crd(kube.api_client())
    release.install({"replicaCount": 2})
    kubeconfig = str(release.operator_kubeconfig(tmp_path))
    election = {
        "FINETUNE_OPERATOR_LEADER_ELECTION_LEASE": f"{release.name}-finetune-operator",
        "FINETUNE_OPERATOR_LEADER_ELECTION_NAMESPACE": release.namespace,
    }
    replicas = [
        OperatorProcess(
            kubeconfig,
            tmp_path / f"{pod}.log",
            {**election, "POD_ID": pod, "FINETUNE_OPERATOR_HEALTH_PORT": str(free_port())},
        )
        for pod in ("operator-a", "operator-b")
    ]

    def healthy(replica: OperatorProcess) -> bool:
        port = replica.extra_env["FINETUNE_OPERATOR_HEALTH_PORT"]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    for replica in replicas:
        replica.start()
    try:
        leaders = wait_for(lambda: [r for r in replicas if "leading: acquired lease" in r.log()], 60, what="a leader")
        standby = wait_for(
            lambda: [r for r in replicas if "waiting to lead: lease" in r.log()], 30, what="one to stand by"
        )
        assert len(leaders) == 1 and standby == [r for r in replicas if r is not leaders[0]]
        assert healthy(standby[0])  # its liveness probe passes while it waits
        drive_job_through_its_life(Jobs(kube.api_client(), namespace), "elected")
        # The standby ran nothing but the election: kopf never started (no watch, no handler, no reconcile).
        standby_lines = standby[0].log().splitlines()
        assert standby_lines and all(" finetune_operator.leader: waiting to lead" in line for line in standby_lines)
        leaders[0].stop()  # SIGTERM: kopf cleans up and the lease is released
        assert leaders[0].process is not None and leaders[0].process.returncode == 0
        assert "released lease" in leaders[0].log()
        wait_for(lambda: "leading: acquired lease" in standby[0].log(), 30, what="the standby to take over")
        wait_for(lambda: "kopf.activities.startup" in standby[0].log(), 30, what="kopf to start in the new leader")
        wait_for(lambda: healthy(standby[0]), 30, what="kopf's /healthz on the port the standby server freed")
        drive_job_through_its_life(Jobs(kube.api_client(), namespace), "after-failover")
    finally:
        for replica in replicas:
            replica.stop()
    for replica in replicas:
        assert_never_forbidden(replica.log())


# --- watchNamespaceSelector: tenants onboard themselves with a label and a RoleBinding ---------------------------

TENANT_LABEL = "finetune.dev/tenant=true"
SELECTOR_VALUES = {"crds": {"enabled": False}, "watchNamespaceSelector": TENANT_LABEL, "replicaCount": 0}


def onboarding(release, namespace: str) -> tuple[list[str], list[str]]:
    """The onboarding step exactly as the chart's NOTES.txt prints it (for its example namespace team-a): the
    `kubectl label` and the `kubectl create rolebinding` command, for `namespace`."""
    notes = render_notes(SELECTOR_VALUES, release=release.name, namespace=release.namespace)
    commands = [line.split()[1:] for line in notes.splitlines() if line.strip().startswith("kubectl ")]
    label = next(c for c in commands if c[:2] == ["label", "namespace"])
    bind = next(c for c in commands if "rolebinding" in c)
    return [namespace if word == "team-a" else word for word in label], [
        namespace if word == "team-a" else word for word in bind
    ]


def onboard(kube, release, namespace: str, *, label: bool = True, bind: bool = True) -> None:
    """Run the onboarding's commands, as a cluster admin would."""
    label_command, bind_command = onboarding(release, namespace)
    for wanted, command in ((bind, bind_command), (label, label_command)):
        if wanted:
            kubectl(*command, kubeconfig=kube.kubeconfig)


def readme_onboarding_manifest(release, namespace: str) -> str:
    """The README's onboarding manifest (Namespace and RoleBinding, for team-a and release namespace
    finetune-system), for `namespace` and the release's namespace."""
    blocks = re.findall(r"```yaml\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    manifest = next(block for block in blocks if "kind: RoleBinding" in block and "finetune.dev/tenant" in block)
    manifest = manifest.replace("namespace: finetune-system", f"namespace: {release.namespace}")
    return manifest.replace("team-a", namespace)


def test_namespace_selector_gives_rights_only_where_a_tenant_bound_them(kube, release, extra_namespaces, tmp_path):
    """No ConfigMap (or any other) right in a namespace that was not onboarded, kube-system included; cluster-wide
    only the namespace reads that find the labelled ones. The tenant is onboarded with the README's manifest."""
    tenant, other = extra_namespaces
    release.install(SELECTOR_VALUES)
    kubectl("apply", "-f", "-", input=readme_onboarding_manifest(release, tenant), kubeconfig=kube.kubeconfig)
    labels = kubernetes.client.CoreV1Api(kube.api_client()).read_namespace(tenant).metadata.labels
    assert labels.get("finetune.dev/tenant") == "true"
    operator = release.operator_client(tmp_path)
    for verb, group, resource, subresource in NEEDED:
        assert can(operator, verb, resource, tenant, group, subresource), (verb, resource, subresource)
        for elsewhere in (other, "kube-system", release.namespace, None):
            assert not can(operator, verb, resource, elsewhere, group, subresource), (elsewhere, verb, resource)
    for verb, group, resource, subresource in NOT_NEEDED:
        assert not can(operator, verb, resource, tenant, group, subresource), (verb, resource, subresource)
    for verb in ("list", "watch"):
        assert can(operator, verb, "namespaces")
    for verb in ("get", "create", "patch", "update", "delete"):
        assert not can(operator, verb, "namespaces", name=tenant), verb
    for verb, group, resource in CLUSTER_SCOPED_NOT_NEEDED:
        assert not can(operator, verb, resource, None, group), (verb, resource)
    # The onboarding grants the chart's rules, pinned, and nothing else.
    rbac = kubernetes.client.RbacAuthorizationV1Api(kube.api_client())
    role = kube.api_client().sanitize_for_serialization(rbac.read_cluster_role(f"{release.name}-finetune-operator"))
    assert flat_rules(role) == APPLICATION_RULES
    bindings = rbac.list_cluster_role_binding(label_selector=f"app.kubernetes.io/instance={release.name}").items
    assert [b.role_ref.name for b in bindings] == [f"{release.name}-finetune-operator-namespaces"]


def test_the_operator_serves_labelled_namespaces_as_they_are_onboarded_without_a_restart(
    kube, release, namespace, extra_namespaces, tmp_path
):
    """The real operator process on the chart's token alone, in selector mode: a job in an onboarded namespace
    runs its whole life; a job in a bound but unlabelled namespace is left alone until the label comes; a
    namespace labelled before its RoleBinding is refused (reported once), then served once bound."""
    admin = kube.api_client()
    install_crd(admin)
    later, bound_late = extra_namespaces
    release.install(SELECTOR_VALUES)
    onboard(kube, release, namespace)
    onboard(kube, release, later, label=False)
    onboard(kube, release, bound_late, bind=False)
    waiting = Jobs(admin, later)
    waiting.create(job_manifest("waiting", gpusPerWorker=0))
    operator = OperatorProcess(
        str(release.operator_kubeconfig(tmp_path)),
        tmp_path / "operator.log",
        {"FINETUNE_OPERATOR_WATCH_NAMESPACE_SELECTOR": TENANT_LABEL},
    )
    operator.start()
    try:
        drive_job_through_its_life(Jobs(admin, namespace), "life")
        # A whole job's life later, the unlabelled namespace's job has not been touched.
        assert not waiting.status("waiting") and not waiting.pods("waiting")
        kubectl("label", "namespace", later, TENANT_LABEL, kubeconfig=kube.kubeconfig)
        waiting.wait_pods("waiting", 2, attempt=0)
        wait_for(lambda: waiting.status("waiting").get("phase"), 30, what="the newly served job's status")

        wait_for(lambda: f"namespace {bound_late} matches" in operator.log(), 60, what="the refusal reported")
        late = Jobs(admin, bound_late)
        late.create(job_manifest("late", gpusPerWorker=0))
        onboard(kube, release, bound_late, label=False)  # its RoleBinding: served within the backoff (20 s)
        late.wait_pods("late", 2, attempt=0, timeout=90)

        kubectl("label", "namespace", later, TENANT_LABEL.split("=")[0] + "-", kubeconfig=kube.kubeconfig)
        wait_for(lambda: f"namespace {later} no longer matches" in operator.log(), 30, what="the label's removal")
        assert operator.process is not None and operator.process.poll() is None, "never restarted"
    finally:
        operator.stop()
    log = operator.log()
    for served in (namespace, later, bound_late):
        assert f"serving namespace {served}" in log, served
    assert log.count(f"namespace {bound_late} matches {TENANT_LABEL}, but the operator may not list") == 1, log
    assert "Traceback" not in log
    assert_never_forbidden(log)
