"""The only module that talks to the API server: a thin layer over the kubernetes client."""

from __future__ import annotations

import json
import logging
from functools import cache
from typing import Any, Callable

import kubernetes
from kubernetes.client import ApiException

from finetune_operator.api import GROUP, PLURAL, VERSION

log = logging.getLogger(__name__)

NOT_FOUND, CONFLICT, INVALID = 404, 409, 422
RECONCILE_THREADS = 16


class StatusConflict(Exception):
    """The job changed since it was read; reconcile again from the fresh object."""


class ObjectRejected(Exception):
    """The API server refused an object the operator built (422): the job's spec is at fault."""


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


def patch_job_status(namespace: str, name: str, status: dict[str, Any], resource_version: str) -> dict[str, Any]:
    """Merge-patch the status, only if the job is still at resource_version (no lost updates)."""
    body = {"metadata": {"resourceVersion": resource_version}, "status": status}
    try:
        return custom().patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name, body)
    except ApiException as e:
        if e.status == CONFLICT:
            raise StatusConflict(f"{namespace}/{name} changed since it was read") from e
        raise


def delete_job(namespace: str, name: str) -> None:
    _tolerate(NOT_FOUND, lambda: custom().delete_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name, propagation_policy="Background"))  # fmt: skip


def delete_pod(namespace: str, name: str) -> None:
    _tolerate(NOT_FOUND, lambda: core().delete_namespaced_pod(name, namespace))


def _creator(kind: str) -> Callable[[str, dict[str, Any]], Any]:
    creators = {
        "Pod": lambda ns, body: core().create_namespaced_pod(ns, body),
        "Service": lambda ns, body: core().create_namespaced_service(ns, body),
        "ConfigMap": lambda ns, body: core().create_namespaced_config_map(ns, body),
        "ServiceAccount": lambda ns, body: core().create_namespaced_service_account(ns, body),
        "Role": lambda ns, body: rbac().create_namespaced_role(ns, body),
        "RoleBinding": lambda ns, body: rbac().create_namespaced_role_binding(ns, body),
    }
    return creators[kind]


def create(obj: dict[str, Any]) -> bool:
    """Create obj; False if it already exists (creates are idempotent). Raises ObjectRejected on 422."""
    namespace = obj["metadata"]["namespace"]
    try:
        _creator(obj["kind"])(namespace, obj)
        return True
    except ApiException as e:
        if e.status == CONFLICT:
            return False
        if e.status == INVALID:
            raise ObjectRejected(f"{obj['kind']} {obj['metadata']['name']}: {_api_message(e)}") from e
        raise


def _api_message(error: ApiException) -> str:
    try:
        return json.loads(error.body).get("message", error.reason)
    except (TypeError, ValueError):
        return str(error.reason)


def _tolerate(status: int, call: Callable[[], Any]) -> None:
    try:
        call()
    except ApiException as e:
        if e.status != status:
            raise
