"""The node services' access to the API server, in plain dicts (the JSON the API server speaks),
through the kubernetes client's REST layer."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import urllib3
from kubernetes import client, config
from kubernetes.client.rest import ApiException
from kubernetes.watch.watch import iter_resp_lines

log = logging.getLogger(__name__)

RETRY_SECONDS = 2.0
WATCH_SECONDS = 60  # the API server ends each watch after this; we then resume from the last version
MERGE_PATCH = "application/merge-patch+json"

WatchHandler = Callable[[str, dict], None]


class Kube:
    def __init__(self, kubeconfig: Path):
        configuration = client.Configuration()
        config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
        self.api_client = client.ApiClient(configuration)
        self.core = client.CoreV1Api(self.api_client)
        self.server = configuration.host

    # Nodes
    def read_node(self, name: str) -> dict | None:
        return _or_none(lambda: _json(self.core.read_node(name, _preload_content=False)))

    def patch_node_status(self, name: str, status: dict) -> None:
        self.core.patch_node_status(name, {"status": status}, _content_type=MERGE_PATCH, _preload_content=False)

    # Storage
    def read_pv(self, name: str) -> dict | None:
        return _or_none(lambda: _json(self.core.read_persistent_volume(name, _preload_content=False)))

    def create_pv(self, volume: dict) -> None:
        try:
            self.core.create_persistent_volume(volume, _preload_content=False)
        except ApiException as error:
            if error.status != 409:
                raise

    def delete_pv(self, name: str) -> None:
        _or_none(lambda: self.core.delete_persistent_volume(name, _preload_content=False))

    def list_pvs(self) -> list[dict]:
        return _json(self.core.list_persistent_volume(_preload_content=False))["items"]

    # Watches
    def watch_pods_on_node(self, node_name: str, handle: WatchHandler, stop: threading.Event) -> None:
        selector = f"spec.nodeName={node_name}"
        self._watch(self.core.list_pod_for_all_namespaces, handle, stop, field_selector=selector)

    def watch_pvcs(self, handle: WatchHandler, stop: threading.Event) -> None:
        self._watch(self.core.list_persistent_volume_claim_for_all_namespaces, handle, stop)

    def _watch(self, list_call: Callable, handle: WatchHandler, stop: threading.Event, **selectors: str) -> None:
        """List, then watch, calling handle(event_type, object) until stop is set.

        The list reports every object as "SYNC" and then the uids that vanished since the last list
        as "DELETED", so a handler sees the same world after a watch expired (410 Gone) as before.
        """
        known: dict[str, dict] = {}
        while not stop.is_set():
            try:
                self._list_and_watch(list_call, handle, stop, known, selectors)
            except (ApiException, urllib3.exceptions.HTTPError, OSError) as error:
                log.warning("watch failed (%s); listing again in %s s", error, RETRY_SECONDS)
                stop.wait(RETRY_SECONDS)

    def _list_and_watch(
        self,
        list_call: Callable,
        handle: WatchHandler,
        stop: threading.Event,
        known: dict[str, dict],
        selectors: dict,
    ) -> None:
        """One list and the watches that follow it, until the watch expires; keeps `known` current."""
        listing = _json(list_call(_preload_content=False, **selectors))
        listed = {item["metadata"]["uid"]: item for item in listing["items"]}
        for item in listed.values():
            handle("SYNC", item)
        for uid in known.keys() - listed.keys():
            handle("DELETED", known[uid])
        known.clear()
        known.update(listed)
        version = listing["metadata"]["resourceVersion"]
        try:
            while not stop.is_set():
                for event_type, item in self._events(list_call, version, selectors):
                    version = item["metadata"]["resourceVersion"]
                    if event_type == "BOOKMARK":
                        continue
                    if event_type == "DELETED":
                        known.pop(item["metadata"]["uid"], None)
                    else:
                        known[item["metadata"]["uid"]] = item
                    handle(event_type, item)
        except WatchExpired:
            log.info("watch expired; listing again")

    def _events(self, list_call: Callable, version: str, selectors: dict) -> Iterator[tuple[str, dict]]:
        response = list_call(
            watch=True,
            resource_version=version,
            timeout_seconds=WATCH_SECONDS,
            allow_watch_bookmarks=True,
            _preload_content=False,
            _request_timeout=(10, WATCH_SECONDS + 30),
            **selectors,
        )
        try:
            for line in iter_resp_lines(response):
                event = json.loads(line)
                if event["type"] == "ERROR":
                    raise WatchExpired(event["object"].get("message", ""))
                yield event["type"], event["object"]
        finally:
            response.release_conn()


class WatchExpired(Exception):
    """The API server no longer has the version a watch asked for; the caller lists again."""


def _json(response) -> dict:
    return json.loads(response.data)


def _or_none(call: Callable):
    """call(), or None where the object does not exist."""
    try:
        return call()
    except ApiException as error:
        if error.status == 404:
            return None
        raise
