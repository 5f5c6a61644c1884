"""The Helm chart through Helm's own engine (helm-python-sdk): render it, install it, and act as its operator.

Importable by any test or tool (`make demo`, tests/e2e):

    from tests.helm.chart import install_chart, chart_operator_kubeconfig

    install_chart(kubeconfig, "finetune-system", values={"crds": {"enabled": False}})
    operator_kubeconfig = chart_operator_kubeconfig(kube, "finetune-system")   # the chart's RBAC only
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes
import yaml

from finetune_dev.demo import adopt_into_release

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "finetune-operator"
RELEASE = "finetune"
HELM_TIMEOUT_SECONDS = 120
# Long enough for the slowest e2e run; the TokenRequest API refuses less than 10 minutes.
TOKEN_SECONDS = 4 * 3600


# The operator's permissions, pinned: any widening (a verb, a resource, a wildcard) fails the render and
# install tests, and must be argued for in the chart's README. (apiGroup, resource, verbs, resourceNames)
APPLICATION_RULES = {
    ("", "events", ("create",), ()),
    ("finetune.dev", "finetunejobs", ("get", "list", "watch", "delete"), ()),
    ("finetune.dev", "finetunejobs/status", ("patch",), ()),
    ("finetune.dev", "finetunejobs/finalizers", ("update",), ()),
    ("", "pods", ("list", "watch", "create", "delete"), ()),
    ("", "services", ("get", "create", "delete"), ()),
    ("", "serviceaccounts", ("get", "create", "delete"), ()),
    ("rbac.authorization.k8s.io", "roles", ("get", "create", "delete"), ()),
    ("rbac.authorization.k8s.io", "rolebindings", ("get", "create", "delete"), ()),
    ("", "configmaps", ("get", "list", "watch", "create", "patch", "delete"), ()),
    ("scheduling.x-k8s.io", "podgroups", ("get", "create", "delete"), ()),
}


def flat_rules(role: dict[str, Any]) -> set[tuple]:
    """A Role's rules as (apiGroup, resource, verbs, resourceNames), one per group and resource."""
    return {
        (group, resource, tuple(rule["verbs"]), tuple(rule.get("resourceNames", ())))
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }


def render(
    values: dict[str, Any] | None = None, *, release: str = RELEASE, namespace: str = "finetune-system"
) -> list[dict[str, Any]]:
    """The chart's objects for `values`, as `helm template` renders them (no cluster; hooks included)."""
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name=release, namespace=namespace, is_install=True)
    objects = []
    for path, text in sorted(manifests.items()):
        if path.endswith(".yaml"):
            objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


def render_notes(
    values: dict[str, Any] | None = None, *, release: str = RELEASE, namespace: str = "finetune-system"
) -> str:
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name=release, namespace=namespace, is_install=True)
    return next(text for path, text in manifests.items() if path.endswith("NOTES.txt"))


def install_chart(
    kubeconfig: str | os.PathLike[str],
    namespace: str,
    values: dict[str, Any] | None = None,
    *,
    release: str = RELEASE,
    upgrade: bool = False,
) -> dict[str, Any]:
    """`helm upgrade --install` of the chart in the repository; returns Helm's release summary.

    Helm keeps the release in a Secret in `namespace`, which is created if missing.
    """
    with helm.Config(kubeconfig_path=kubeconfig, namespace=namespace) as config:
        if upgrade or _has_release(config, release):
            return config.upgrade(CHART, release, values or {}, namespace=namespace, timeout=HELM_TIMEOUT_SECONDS)
        return config.install(
            CHART, release, values or {}, namespace=namespace, create_namespace=True, timeout=HELM_TIMEOUT_SECONDS
        )


def uninstall_chart(kubeconfig: str | os.PathLike[str], namespace: str, *, release: str = RELEASE) -> None:
    with helm.Config(kubeconfig_path=kubeconfig, namespace=namespace) as config:
        config.uninstall(release, ignore_not_found=True, timeout=HELM_TIMEOUT_SECONDS)


def _has_release(config: helm.Config, release: str) -> bool:
    try:
        config.status(release)
        return True
    except helm.HelmNotFoundError:
        return False


def adopt_cluster_objects(
    api_client: kubernetes.client.ApiClient, names: list[str], namespace: str, *, release: str = RELEASE
) -> None:
    """Let the release take over CRDs that exist already (the demo does the same)."""
    adopt_into_release(api_client, names, release, namespace)


def operator_service_account(
    api_client: kubernetes.client.ApiClient, release_namespace: str, release: str = RELEASE
) -> str:
    """The name of the ServiceAccount the chart made for the operator of `release`."""
    accounts = kubernetes.client.CoreV1Api(api_client).list_namespaced_service_account(
        release_namespace, label_selector=f"app.kubernetes.io/instance={release},app.kubernetes.io/component=operator"
    )
    names = [account.metadata.name for account in accounts.items]
    if len(names) != 1:
        raise LookupError(f"expected one operator ServiceAccount of release {release} in {release_namespace}: {names}")
    return names[0]


def service_account_token(
    api_client: kubernetes.client.ApiClient, namespace: str, name: str, seconds: int = TOKEN_SECONDS
) -> str:
    """A bound token for ServiceAccount namespace/name from the TokenRequest API (what kubelets mount)."""
    request = kubernetes.client.AuthenticationV1TokenRequest(
        spec=kubernetes.client.V1TokenRequestSpec(audiences=[], expiration_seconds=seconds)
    )
    response = kubernetes.client.CoreV1Api(api_client).create_namespaced_service_account_token(name, namespace, request)
    return response.status.token


def kubeconfig_for_token(
    admin_kubeconfig: str | os.PathLike[str], token: str, path: Path, user: str = "finetune-operator"
) -> Path:
    """A copy of `admin_kubeconfig`'s current cluster (server, CA) that authenticates with `token` only."""
    admin = yaml.safe_load(Path(admin_kubeconfig).read_text())
    context = next(c["context"] for c in admin["contexts"] if c["name"] == admin["current-context"])
    cluster = next(c for c in admin["clusters"] if c["name"] == context["cluster"])
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": user, "context": {"cluster": cluster["name"], "user": user}}],
        "current-context": user,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def chart_operator_kubeconfig(
    kube: Any, release_namespace: str, *, release: str = RELEASE, path: Path | None = None
) -> Path:
    """Write a kubeconfig that authenticates as the chart's operator ServiceAccount, and return its path.

    `kube` is the session's cluster (tests/conftest.py): its admin kubeconfig gives the server and CA,
    its admin client asks the TokenRequest API for the token. Run `finetune operator` with
    KUBECONFIG pointing here and it has exactly the chart's RBAC.
    """
    api_client = kube.api_client()
    account = operator_service_account(api_client, release_namespace, release)
    token = service_account_token(api_client, release_namespace, account)
    path = path or Path(kube.kubeconfig).parent / f"kubeconfig-{release_namespace}-{account}"
    user = f"system:serviceaccount:{release_namespace}:{account}"
    return kubeconfig_for_token(kube.kubeconfig, token, path, user=user)


def token_api_client(kubeconfig: Path) -> kubernetes.client.ApiClient:
    """A kubernetes client authenticated by `kubeconfig` alone (not the process's KUBECONFIG)."""
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    return kubernetes.client.ApiClient(configuration)
