"""The only module that talks to the API server: a thin layer over the kubernetes client."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from functools import cache
from typing import Any

import kubernetes
from kubernetes.client import ApiException

from finetune_operator.api import GROUP, PLURAL, VERSION

log = logging.getLogger(__name__)

FORBIDDEN, NOT_FOUND, CONFLICT, INVALID, TOO_MANY_REQUESTS = 403, 404, 409, 422, 429
RECONCILE_THREADS = 16


class StatusConflict(Exception):
    """The job changed since it was read; reconcile again from the fresh object."""


class ObjectRejected(Exception):
    """The API server refused an object the operator built (422): the job's spec is at fault."""


class CreationRefused(Exception):
    """The API server refused to create an object (403: a ResourceQuota, an admission webhook, RBAC): it may
    pass later, so the job retries with its own growing backoff; `reason` is the server's."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class RetryLater(Exception):
    """The API server asked for a retry after `seconds` (429 or 5xx with retryAfterSeconds): a transient
    state, such as a ServiceAccount the token controller has not given a token yet (before Kubernetes 1.24)."""

    def __init__(self, message: str, seconds: float) -> None:
        super().__init__(message)
        self.seconds = seconds


@cache
def api_client() -> kubernetes.client.ApiClient:
    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(client_configuration=configuration)
    # One connection per reconcile thread, so a burst of jobs does not queue on a 4-connection pool.
    configuration.connection_pool_maxsize = RECONCILE_THREADS
    return kubernetes.client.ApiClient(configuration)


def core() -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(api_client())


def custom() -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(api_client())


def rbac() -> kubernetes.client.RbacAuthorizationV1Api:
    return kubernetes.client.RbacAuthorizationV1Api(api_client())


def get_job(namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return custom().get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as e:
        if e.status == NOT_FOUND:
            return None
        raise


def patch_job_status(namespace: str, name: str, status: dict[str, Any], resource_version: str | None) -> dict[str, Any]:
    """Merge-patch the status, only if the job is still at resource_version (no lost updates) when given."""
    body: dict[str, Any] = {"status": status}
    if resource_version is not None:
        body["metadata"] = {"resourceVersion": resource_version}
    try:
        return custom().patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name, body)
    except ApiException as e:
        if e.status == CONFLICT:
            raise StatusConflict(f"{namespace}/{name} changed since it was read") from e
        raise


def delete_job(namespace: str, name: str) -> None:
    _tolerate(
        NOT_FOUND,
        lambda: custom().delete_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, propagation_policy="Background"
        ),
    )


def delete_pod(namespace: str, name: str, uid: str | None = None, grace_period_seconds: int | None = None) -> bool:
    """Delete a pod (only the one with `uid`, when given); False when it is not there any more, which for
    a pod the operator still knows means its watch missed the deletion (a ghost)."""
    options = kubernetes.client.V1DeleteOptions(
        preconditions=kubernetes.client.V1Preconditions(uid=uid) if uid else None,
        grace_period_seconds=grace_period_seconds,
    )
    try:
        core().delete_namespaced_pod(name, namespace, body=options, _preload_content=False).read()
        return True
    except ApiException as e:
        if e.status == NOT_FOUND or (e.status == CONFLICT and uid):  # gone, or another pod took the name
            return False
        raise


def owner_uids(kind: str, namespace: str, name: str) -> list[str] | None:
    """The uids of an object's owners; None when it does not exist."""
    try:
        obj = _verbs(kind)["read"](name, namespace)
    except ApiException as e:
        if e.status == NOT_FOUND:
            return None
        raise
    if isinstance(obj, dict):  # a custom resource comes back as a dict
        return [ref["uid"] for ref in obj["metadata"].get("ownerReferences") or []]
    return [ref.uid for ref in obj.metadata.owner_references or []]


def delete(kind: str, namespace: str, name: str) -> None:
    # Unparsed: Kubernetes 1.20 answers some deletes (a Service's) with a Status the client reads as the kind.
    _tolerate(NOT_FOUND, lambda: _verbs(kind)["delete"](name, namespace, _preload_content=False).read())


def _verbs(kind: str) -> dict[str, Callable[..., Any]]:
    core_api, rbac_api = core(), rbac()
    method = {
        "Pod": (core_api, "namespaced_pod"),
        "Service": (core_api, "namespaced_service"),
        "ConfigMap": (core_api, "namespaced_config_map"),
        "ServiceAccount": (core_api, "namespaced_service_account"),
        "Role": (rbac_api, "namespaced_role"),
        "RoleBinding": (rbac_api, "namespaced_role_binding"),
    }
    if kind == "PodGroup":  # scheduler-plugins' PodGroup (spec.gangScheduling), a custom resource
        return _pod_group_verbs()
    api_object, suffix = method[kind]
    return {verb: getattr(api_object, f"{verb}_{suffix}") for verb in ("create", "read", "delete")}


def _pod_group_verbs() -> dict[str, Callable[..., Any]]:
    api, where = custom(), ("scheduling.x-k8s.io", "v1alpha1")

    def create(namespace: str, body: dict[str, Any], **kwargs: Any) -> Any:
        return api.create_namespaced_custom_object(*where, namespace, "podgroups", body, **kwargs)

    def read(name: str, namespace: str) -> Any:
        return api.get_namespaced_custom_object(*where, namespace, "podgroups", name)

    def delete(name: str, namespace: str, **kwargs: Any) -> Any:
        return api.delete_namespaced_custom_object(*where, namespace, "podgroups", name, **kwargs)

    return {"create": create, "read": read, "delete": delete}


def _creator(kind: str) -> Callable[..., Any]:
    return _verbs(kind)["create"]


def create(obj: dict[str, Any]) -> bool:
    """Create obj; False if it already exists (the caller checks whose it is). Raises ObjectRejected on 422,
    CreationRefused on 403 and RetryLater when the server asks for a retry."""
    namespace = obj["metadata"]["namespace"]
    try:
        # The created object is not used: unparsed, it costs no client-model building (most of a create's CPU).
        _creator(obj["kind"])(namespace, obj, _preload_content=False).read()
        return True
    except ApiException as e:
        if e.status == CONFLICT:
            return False
        if e.status == INVALID:
            raise ObjectRejected(f"{obj['kind']} {obj['metadata']['name']}: {_api_message(e)}") from e
        if e.status == NOT_FOUND:  # the kind is not served, e.g. a PodGroup without scheduler-plugins' CRD
            raise ObjectRejected(
                f"{obj['kind']} {obj['metadata']['name']}: the API server does not serve {obj['apiVersion']} "
                f"{obj['kind']}; install its CRD or drop what asks for it (spec.gangScheduling for a PodGroup)"
            ) from e
        if e.status == FORBIDDEN:
            reason = _status_body(e).get("reason") or "Forbidden"
            raise CreationRefused(f"{obj['kind']} {obj['metadata']['name']}: {_api_message(e)}", reason) from e
        retry_after = _retry_after_seconds(e)
        if retry_after is not None:
            raise RetryLater(f"{obj['kind']} {obj['metadata']['name']}: {_api_message(e)}", retry_after) from e
        raise


def _status_body(error: ApiException) -> dict[str, Any]:
    try:
        body = json.loads(error.body)
    except (TypeError, ValueError):
        return {}
    return body if isinstance(body, dict) else {}


def _api_message(error: ApiException) -> str:
    return _status_body(error).get("message", str(error.reason))


def _retry_after_seconds(error: ApiException) -> float | None:
    if error.status != TOO_MANY_REQUESTS and (error.status is None or error.status < 500):
        return None
    seconds = (_status_body(error).get("details") or {}).get("retryAfterSeconds")
    return float(seconds) if isinstance(seconds, (int, float)) else None


def _tolerate(status: int, call: Callable[[], Any]) -> None:
    try:
        call()
    except ApiException as e:
        if e.status != status:
            raise
