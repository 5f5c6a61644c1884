"""The only module that talks to the API server: a thin layer over the kubernetes client."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from datetime import datetime, timezone
from functools import cache, partial
from typing import Any
from urllib.parse import quote, urlencode

import kubernetes
from kubernetes.client import ApiException
from kubernetes.utils.keepalive import tcp_keepalive_socket_options

from finetune_operator.api import GROUP, PLURAL, VERSION

log = logging.getLogger(__name__)

FORBIDDEN, NOT_FOUND, CONFLICT, GONE, INVALID, TOO_MANY_REQUESTS = 403, 404, 409, 410, 422, 429
RECONCILE_THREADS = 16
CREATE_THREADS = 32  # creates of one pass go out together (a job's objects, then its pods), shared by all passes
BACKGROUND_THREADS = 8  # Events and gangs' companion objects, posted once the pod creates pause
# In a burst of new jobs the API server's write throughput bounds how soon their pods exist, so what can wait
# (Events, the objects a gang's pods do not need at creation) waits until the operator's pod creates have
# paused this long, but never longer than BACKGROUND_AT_MOST_SECONDS after it was handed over.
POD_CREATES_PAUSE_SECONDS = 0.3
BACKGROUND_AT_MOST_SECONDS = 10.0
WATCH_CONNECTIONS = 12  # informer.py's watches hold a connection each (three kinds, a few watched namespaces)
WATCH_SECONDS = 270  # the server ends each watch well before typical load balancer idle timeouts (often 5-10 min)
WATCH_READ_SLACK_SECONDS = 30  # a watch silent this long past its server-side end is a dead connection
# Every request has a connect and a read timeout, so a server that accepts and never answers (a partition, an
# overloaded or half-dead API server) costs a pass a failure and a retry with backoff, never a stuck thread.
CONNECT_SECONDS = 5.0
READ_SECONDS = 30.0
FIELD_MANAGER = "finetune-operator"  # managedFields name the operator as the writer of what it writes
COMPONENT = "finetune-operator"  # the Events' source, the "From" column of `kubectl describe`
EVENT_MESSAGE_MAX = 1024
AUTH_REFRESH_SECONDS = 60.0


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


class WatchExpired(Exception):
    """The resourceVersion a watch started from is gone from the API server's history (410): list again."""


class DeadlineExceeded(Exception):
    """The pass (or lease renewal) ran out of its time (see `deadline`) before this request could be made."""


class RetryLater(Exception):
    """The API server asked for a retry after `seconds` (429 or 5xx with retryAfterSeconds): a transient
    state, such as a ServiceAccount the token controller has not given a token yet (before Kubernetes 1.24)."""

    def __init__(self, message: str, seconds: float) -> None:
        super().__init__(message)
        self.seconds = seconds


# One configuration loading at a time: the kubernetes client writes a kubeconfig's certificate-authority-data to
# a temp file that it caches by content and names before writing it, so a thread loading at the same moment could
# connect with the still-empty file (informers start in parallel: NO_CERTIFICATE_OR_CRL_FOUND, seen in CI).
_loading = threading.Lock()


@cache
def api_client() -> kubernetes.client.ApiClient:
    configuration = kubernetes.client.Configuration()
    with _loading:
        try:
            kubernetes.config.load_incluster_config(client_configuration=configuration)
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config(os.environ.get("KUBECONFIG"), client_configuration=configuration)
    return client_for(configuration)


def client_for(configuration: kubernetes.client.Configuration) -> kubernetes.client.ApiClient:
    """A client with the operator's connection settings for a loaded configuration."""
    # One connection per reconcile thread, so a burst of jobs does not queue on a 4-connection pool.
    configuration.connection_pool_maxsize = RECONCILE_THREADS + CREATE_THREADS + BACKGROUND_THREADS + WATCH_CONNECTIONS
    # No urllib3 retries: they repeat a read timeout under the operator's own backoff (a 2 s Lease call took 8 s).
    configuration.retries = False
    # client-go's keepalive (30 s idle): a connection to a vanished server is dropped, not waited on forever.
    configuration.socket_options = tcp_keepalive_socket_options()
    return kubernetes.client.ApiClient(configuration)


# Where each kind the operator writes lives: (API group path, plural). Requests go through `_request`, not the
# generated API classes: those validate every argument and body into pydantic models and back (about a
# quarter of the operator's CPU at 100 jobs), for objects the operator builds as plain dicts anyway.
PATHS = {
    "Pod": ("/api/v1", "pods"),
    "Service": ("/api/v1", "services"),
    "ConfigMap": ("/api/v1", "configmaps"),
    "ServiceAccount": ("/api/v1", "serviceaccounts"),
    "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings"),
    "PodGroup": ("/apis/scheduling.x-k8s.io/v1alpha1", "podgroups"),  # scheduler-plugins' (spec.gangScheduling)
    "Lease": ("/apis/coordination.k8s.io/v1", "leases"),  # leader election (leader.py)
    "FineTuneJob": (f"/apis/{GROUP}/{VERSION}", PLURAL),
    "Event": ("/api/v1", "events"),
    "Namespace": ("/api/v1", "namespaces"),  # watched, by label, with watch_namespace_selector (informer.py)
}


def _path(kind: str, namespace: str | None, name: str | None = None) -> str:
    """The path of a kind's objects in a namespace (all namespaces when None), or of one of them."""
    prefix, plural = PATHS[kind]
    where = f"/namespaces/{quote(namespace, safe='')}" if namespace is not None else ""
    return f"{prefix}{where}/{plural}" + (f"/{quote(name, safe='')}" if name else "")


_credentials: tuple[float, dict[str, str]] = (-AUTH_REFRESH_SECONDS, {})  # when read, the headers they make


def _auth_headers(client: kubernetes.client.ApiClient) -> dict[str, str]:
    """The credentials' headers, read again once a minute as client-go re-reads a token file. The client's own
    refresh hook runs on every request and reloads the whole configuration (a walk through the environment
    for proxies among it): a fifth of the operator's CPU when it ran per request."""
    global _credentials
    read_at, headers = _credentials
    if time.monotonic() - read_at >= AUTH_REFRESH_SECONDS:
        headers = {}
        client.update_params_for_auth(headers, [], ["BearerToken"], "", "GET", None)
        _credentials = (time.monotonic(), headers)
    return headers


class _Deadline(threading.local):
    at: float | None = None  # time.monotonic() by which this thread's requests must be done; None: no deadline


_deadline = _Deadline()


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Requests this thread makes in the block end within `seconds` from now (an earlier deadline around it
    stays): each one's timeout is cut to what is left, and one due after it raises DeadlineExceeded. Bounds a
    reconcile pass or a lease renewal as a whole, not only each request."""
    previous = _deadline.at
    at = time.monotonic() + seconds
    _deadline.at = at if previous is None else min(previous, at)
    try:
        yield
    finally:
        _deadline.at = previous


def _with_deadline(at: float | None, call: Callable[[], Any]) -> Any:
    """Run call under the deadline `at` (a thread's deadline, carried into a pool's thread)."""
    previous, _deadline.at = _deadline.at, at
    try:
        return call()
    finally:
        _deadline.at = previous


def request_timeout(timeout: float | None = None) -> float | tuple[float, float]:
    """The timeout of one request: (connect, read) seconds, or one total when the thread's deadline is nearer."""
    read = READ_SECONDS if timeout is None else timeout
    if _deadline.at is None:
        return (min(CONNECT_SECONDS, read), read)
    left = _deadline.at - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded("out of time for this pass; giving up, to retry with backoff")
    return left if left < CONNECT_SECONDS + read else (min(CONNECT_SECONDS, read), read)


def _send(method: str, path: str, body: Any = None, content_type: str | None = None, timeout: Any = None) -> Any:
    """Send one request with the client's connection pool and credentials (refreshed tokens included); the
    reply not read yet. `timeout`: seconds to connect and to read, or a (connect, read) pair."""
    client = api_client()
    headers = {**client.default_headers, "Accept": "application/json", **_auth_headers(client)}
    if body is not None:
        headers["Content-Type"] = content_type or "application/json"
    url = client.configuration.host + path
    return client.rest_client.request(method, url, headers=headers, body=body, _request_timeout=timeout)


def _request(
    method: str,
    path: str,
    body: Any = None,
    content_type: str | None = None,
    parse: bool = True,
    timeout: float | None = None,
) -> Any:
    """One request, ended within `timeout` seconds of reading (READ_SECONDS by default) and the thread's
    deadline; the reply parsed as JSON when `parse`. Raises ApiException (status, body) as the generated client
    does, urllib3's errors on a timeout or a dropped connection."""
    if method in ("POST", "PUT", "PATCH"):
        path += ("&" if "?" in path else "?") + urlencode({"fieldManager": FIELD_MANAGER})
    response = _send(method, path, body, content_type, request_timeout(timeout))
    data = response.read()
    if not 200 <= response.status <= 299:
        raise ApiException(http_resp=response)
    return json.loads(data) if parse and data else None


def list_objects(kind: str, namespace: str | None, label_selector: str) -> tuple[list[dict[str, Any]], str]:
    """The objects of a kind with the label selector, and the resourceVersion to watch them from."""
    reply = _request("GET", _path(kind, namespace) + "?" + urlencode({"labelSelector": label_selector}))
    return reply["items"], reply["metadata"]["resourceVersion"]


def watch(kind: str, namespace: str | None, label_selector: str, resource_version: str) -> Iterator[dict[str, Any]]:
    """The watch events ({"type", "object"}) after resource_version, bookmarks included, until the server ends
    the watch (after WATCH_SECONDS). Raises WatchExpired when resource_version is too old."""
    query = urlencode(
        {
            "labelSelector": label_selector,
            "watch": "1",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": WATCH_SECONDS,
        }
    )
    read_timeout = WATCH_SECONDS + WATCH_READ_SLACK_SECONDS
    response = _send("GET", f"{_path(kind, namespace)}?{query}", timeout=(CONNECT_SECONDS, read_timeout))
    if response.status == GONE:
        response.read()
        raise WatchExpired(f"{kind} watch from resourceVersion {resource_version}: gone")
    if not 200 <= response.status <= 299:
        raise ApiException(http_resp=response)
    stream = response.response
    try:
        yield from watch_events(stream.stream(2**16, decode_content=True), kind)
    finally:
        stream.release_conn()


def watch_events(chunks: Iterable[bytes], kind: str) -> Iterator[dict[str, Any]]:
    """The events of a watch stream (one JSON object per line, lines split across chunks at random)."""
    pending = b""
    for chunk in chunks:
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            if not line.strip():
                continue
            event = json.loads(line)
            if event["type"] == "ERROR":
                status = event.get("object") or {}
                if status.get("code") == GONE:
                    raise WatchExpired(f"{kind} watch: {status.get('message')}")
                raise ApiException(status=status.get("code"), reason=status.get("message"))
            yield event


def get_job(namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return _request("GET", _path("FineTuneJob", namespace, name))
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
        return _request(
            "PATCH",
            _path("FineTuneJob", namespace, name) + "/status",
            body,
            content_type="application/merge-patch+json",
        )
    except ApiException as e:
        if e.status == CONFLICT:
            raise StatusConflict(f"{namespace}/{name} changed since it was read") from e
        raise


def delete_job(namespace: str, name: str, uid: str) -> None:
    """Delete the job with this uid: never a new job that took its name since (TTL deletes come late)."""
    options = {"propagationPolicy": "Background", "preconditions": {"uid": uid}}
    try:
        _request("DELETE", _path("FineTuneJob", namespace, name), options, parse=False)
    except ApiException as e:
        if e.status not in (NOT_FOUND, CONFLICT):  # gone already, or another job holds the name now
            raise


def delete_pod(namespace: str, name: str, uid: str | None = None, grace_period_seconds: int | None = None) -> bool:
    """Delete a pod (only the one with `uid`, when given); False when it is not there any more, which for
    a pod the operator still knows means its watch missed the deletion (a ghost)."""
    options: dict[str, Any] = {}
    if uid:
        options["preconditions"] = {"uid": uid}
    if grace_period_seconds is not None:
        options["gracePeriodSeconds"] = grace_period_seconds
    try:
        _request("DELETE", _path("Pod", namespace, name), options or None, parse=False)
        return True
    except ApiException as e:
        if e.status == NOT_FOUND or (e.status == CONFLICT and uid):  # gone, or another pod took the name
            return False
        raise


def get(kind: str, namespace: str, name: str, timeout: float | None = None) -> dict[str, Any] | None:
    """An object; None when it does not exist."""
    try:
        return _request("GET", _path(kind, namespace, name), timeout=timeout)
    except ApiException as e:
        if e.status == NOT_FOUND:
            return None
        raise


def replace(obj: dict[str, Any], timeout: float | None = None) -> bool:
    """Replace obj (PUT) if it is still at its metadata.resourceVersion; False when it changed since (409)."""
    metadata = obj["metadata"]
    try:
        _request("PUT", _path(obj["kind"], metadata["namespace"], metadata["name"]), obj, parse=False, timeout=timeout)
        return True
    except ApiException as e:
        if e.status == CONFLICT:
            return False
        raise


def patch(kind: str, namespace: str, name: str, changes: dict[str, Any], resource_version: str) -> bool:
    """Merge-patch an object if it is still at resource_version; False when it changed or went since (409, 404)."""
    body = {**changes, "metadata": {**changes.get("metadata", {}), "resourceVersion": resource_version}}
    try:
        _request("PATCH", _path(kind, namespace, name), body, "application/merge-patch+json", parse=False)
        return True
    except ApiException as e:
        if e.status in (CONFLICT, NOT_FOUND):
            return False
        raise


def owner_uids(kind: str, namespace: str, name: str) -> list[str] | None:
    """The uids of an object's owners; None when it does not exist."""
    obj = get(kind, namespace, name)
    return None if obj is None else [ref["uid"] for ref in obj["metadata"].get("ownerReferences") or []]


def delete(kind: str, namespace: str, name: str) -> None:
    # Unparsed: Kubernetes 1.20 answers some deletes (a Service's) with a Status, others with the object.
    _tolerate(NOT_FOUND, lambda: _request("DELETE", _path(kind, namespace, name), parse=False))


@cache
def _create_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=CREATE_THREADS, thread_name_prefix="create")


def in_parallel(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run the calls at once (each mostly waits on the API server); their results in order. When any raise,
    all are still waited for and the first one's exception (in call order) is raised."""
    if len(calls) <= 1:
        return [call() for call in calls]
    futures = [_create_pool().submit(_with_deadline, _deadline.at, call) for call in calls]
    errors = [future.exception() for future in futures]
    for error in errors:
        if error is not None:
            raise error
    return [future.result() for future in futures]


class PodCreates:
    """The operator's pod creates in flight and when the last one ended, for the work that waits for a pause."""

    def __init__(
        self,
        pause: float = POD_CREATES_PAUSE_SECONDS,
        at_most: float = BACKGROUND_AT_MOST_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.pause, self.at_most = pause, at_most
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        self._in_flight = 0
        self._last_ended = -float("inf")

    @contextmanager
    def creating(self) -> Iterator[None]:
        with self._lock:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1
                self._last_ended = self._clock()

    def wait_for_pause(self, since: float) -> None:
        """Block until no pod create has run for `pause` seconds, or `at_most` seconds after `since`."""
        deadline = since + self.at_most
        while True:
            with self._lock:
                now = self._clock()
                paused_at = now + self.pause if self._in_flight else self._last_ended + self.pause
            until = min(paused_at, deadline)
            if now >= until:
                return
            self._sleep(until - now)  # a timer, not a request: the pause is measured in this process


pod_creates = PodCreates()


@cache
def _background_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=BACKGROUND_THREADS, thread_name_prefix="background")


class InFlight:
    """A count of work under way, to wait for at shutdown."""

    def __init__(self) -> None:
        self._count = 0
        self._changed = threading.Condition()

    def begin(self) -> None:
        with self._changed:
            self._count += 1

    def end(self) -> None:
        with self._changed:
            self._count -= 1
            self._changed.notify_all()

    def wait_idle(self, seconds: float) -> bool:
        """Block until nothing is under way, at most `seconds`; whether nothing is."""
        with self._changed:
            return self._changed.wait_for(lambda: self._count == 0, timeout=max(seconds, 0))


background = InFlight()  # Events and companion objects handed to the background and not done yet


def when_pods_pause(call: Callable[[], None]) -> None:
    """Run call in the background once the operator's pod creates pause (see POD_CREATES_PAUSE_SECONDS)."""
    since = time.monotonic()

    def run() -> None:
        try:
            pod_creates.wait_for_pause(since)
            call()
        except Exception:  # the caller handles its own failures; this one is a bug, and worth its trace
            log.exception("background work failed")
        finally:
            background.end()

    background.begin()  # counted from the hand-over: a shutdown waits for work still waiting for its thread
    _background_pool().submit(run)


def post_event(involved: dict[str, Any], type: str, reason: str, message: str) -> None:
    """Post an Event about `involved` in the background, as client-go's recorder does: no pass waits on it,
    and a failure is logged, never raised. It waits for a pause in pod creates; its timestamps are now."""
    metadata = involved["metadata"]
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    if len(message) > EVENT_MESSAGE_MAX:
        message = message[: EVENT_MESSAGE_MAX - 3] + "..."
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"namespace": metadata["namespace"], "generateName": f"{metadata['name']}."},
        "involvedObject": {
            "apiVersion": involved.get("apiVersion", f"{GROUP}/{VERSION}"),
            "kind": involved.get("kind", "FineTuneJob"),
            "namespace": metadata["namespace"],
            "name": metadata["name"],
            "uid": metadata.get("uid"),
            "resourceVersion": metadata.get("resourceVersion"),
        },
        "type": type,
        "reason": reason,
        "message": message,
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "reportingInstance": _instance(),
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
    when_pods_pause(partial(_post_event, event))


@cache
def _instance() -> str:
    return os.environ.get("POD_ID") or socket.gethostname()


def _post_event(event: dict[str, Any]) -> None:
    try:
        _request("POST", _path("Event", event["metadata"]["namespace"]), event, parse=False)
    except Exception as error:  # an Event is worth a log line, never a failed pass
        about, why = event["involvedObject"], _api_message(error) if isinstance(error, ApiException) else error
        log.warning("event %s for %s/%s not posted: %s", event["reason"], about["namespace"], about["name"], why)


def create(obj: dict[str, Any], timeout: float | None = None) -> bool:
    """Create obj; False if it already exists (the caller checks whose it is). Raises ObjectRejected on 422,
    CreationRefused on 403 and RetryLater when the server asks for a retry."""
    namespace = obj["metadata"]["namespace"]
    try:
        with pod_creates.creating() if obj["kind"] == "Pod" else nullcontext():
            _request("POST", _path(obj["kind"], namespace), obj, parse=False, timeout=timeout)  # result not used
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
