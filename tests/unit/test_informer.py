"""informer.py against a scripted API server: listing, watch events, a watch gap (410) and pods found gone."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from finetune_operator import informer, kube
from finetune_operator.builders import LABEL_JOB
from finetune_operator.informer import Informer, Tenants, job_view, progress_view, worker_view
from finetune_operator.status import DEPARTED, taken_by_disruption
from finetune_trainer.contract import PROGRESS_KEY


def pod(name: str, job: str, version: str, namespace: str = "ml", phase: str = "Pending") -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": f"uid-{namespace}-{name}",
            "resourceVersion": version,
            "labels": {LABEL_JOB: job},
            "managedFields": [{"manager": "kube-scheduler"}],
        },
        "spec": {"nodeName": "node-1", "containers": [{"name": "trainer", "image": "trainer:1"}]},
        "status": {"phase": phase},
    }


class Server:
    """Scripted replies: each list() returns the next listing, each watch() yields the next script (a list of
    events, then an optional exception to raise)."""

    def __init__(self, listings: list[list[dict[str, Any]]], watches: list[tuple[list, Exception | None]]) -> None:
        self.listings, self.watches = listings, watches
        self.requests: list[tuple[str, str | None, str | None]] = []
        self.done = threading.Event()
        self.informer: Informer  # stopped when the script is over

    def list_objects(self, kind: str, namespace: str | None, selector: str) -> tuple[list[dict], str]:
        self.requests.append(("list", namespace, None))
        return self.listings.pop(0), f"list-{len(self.requests)}"

    def watch(self, kind: str, namespace: str | None, selector: str, version: str) -> Iterator[dict[str, Any]]:
        self.requests.append(("watch", namespace, version))
        if not self.watches:
            self.done.set()
            self.informer.stop()
            raise ConnectionError("script over")
        events, error = self.watches.pop(0)
        for event_type, obj in events:
            yield {"type": event_type, "object": obj}
        if error is not None:
            raise error


@pytest.fixture
def changed() -> list[tuple[str, str]]:
    return []


def serve(monkeypatch: pytest.MonkeyPatch, server: Server) -> None:
    monkeypatch.setattr(kube, "list_objects", server.list_objects)
    monkeypatch.setattr(kube, "watch", server.watch)
    monkeypatch.setattr(informer, "FAILURE_BACKOFF_SECONDS", (0,))


def names(pods: list[dict[str, Any]]) -> list[str]:
    return sorted(p["metadata"]["name"] for p in pods)


def test_a_listing_indexes_slim_pods_by_job_and_wakes_each_job(monkeypatch, changed):
    serve(
        monkeypatch,
        Server([[pod("a-worker-0", "a", "1"), pod("a-worker-1", "a", "2"), pod("b-worker-0", "b", "3")]], []),
    )
    pods = Informer("Pod", LABEL_JOB, [], worker_view, changed.append)
    assert pods.list(None) == "list-1"
    assert names(pods.get(("ml", "a"))) == ["a-worker-0", "a-worker-1"]
    assert names(pods.get(("ml", "b"))) == ["b-worker-0"] and pods.get(("ml", "c")) == []
    assert sorted(changed) == [("ml", "a"), ("ml", "b")]
    (indexed,) = pods.get(("ml", "b"))
    assert "managedFields" not in indexed["metadata"] and indexed["spec"] == {"nodeName": "node-1"}


def test_watch_events_keep_the_index_and_wake_only_jobs_whose_pods_changed(monkeypatch, changed):
    first = pod("a-worker-0", "a", "1")
    events = [
        ("MODIFIED", first),  # the listed version again: nothing new
        ("ADDED", pod("b-worker-0", "b", "5")),
        ("MODIFIED", pod("a-worker-0", "a", "6", phase="Running")),
        ("BOOKMARK", {"metadata": {"resourceVersion": "7"}}),
        ("DELETED", pod("b-worker-0", "b", "8")),
        ("DELETED", pod("never-seen", "c", "9")),
    ]
    serve(monkeypatch, Server([[first]], []))
    pods = Informer("Pod", LABEL_JOB, [], worker_view, changed.append)
    pods.list(None)
    changed.clear()
    for event_type, obj in events:
        pods.apply({"type": event_type, "object": obj})
    assert changed == [("ml", "b"), ("ml", "a"), ("ml", "b")]
    assert [p["status"]["phase"] for p in pods.get(("ml", "a"))] == ["Running"]
    assert pods.get(("ml", "b")) == []


def test_the_job_informer_keeps_each_job_by_its_own_name_without_managed_fields(monkeypatch, changed):
    job = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "a", "namespace": "ml", "uid": "uid-a", "resourceVersion": "1", "managedFields": [{}]},
        "spec": {"workers": 2},
    }
    serve(monkeypatch, Server([[job]], []))
    jobs = Informer("FineTuneJob", "", [], job_view, changed.append)
    jobs.list(None)
    (watched,) = jobs.get(("ml", "a"))
    assert watched["spec"] == {"workers": 2} and "managedFields" not in watched["metadata"]
    assert "managedFields" in job["metadata"]  # the listed object itself is left as it was
    jobs.apply({"type": "MODIFIED", "object": {**job, "metadata": {**job["metadata"], "resourceVersion": "2"}}})
    jobs.apply({"type": "DELETED", "object": {**job, "metadata": {**job["metadata"], "resourceVersion": "3"}}})
    assert changed == [("ml", "a")] * 3 and jobs.get(("ml", "a")) == []


def test_after_a_watch_gap_a_new_listing_drops_the_pods_deleted_meanwhile(monkeypatch, changed):
    """410 Gone: the events of the gap are lost, deletions included; listing again is the only way to know."""
    kept, deleted = pod("a-worker-0", "a", "1"), pod("b-worker-0", "b", "2")
    server = Server(
        [[kept, deleted], [kept]],
        [([], kube.WatchExpired("Pod watch from resourceVersion list-1: gone"))],
    )
    serve(monkeypatch, server)
    pods = server.informer = Informer("Pod", LABEL_JOB, [], worker_view, changed.append)
    pods.start()
    assert server.done.wait(10), server.requests
    assert server.requests[:3] == [("list", None, None), ("watch", None, "list-1"), ("list", None, None)]
    assert server.requests[3] == ("watch", None, "list-3")  # from the new listing's version
    assert names(pods.get(("ml", "a"))) == ["a-worker-0"] and pods.get(("ml", "b")) == []
    assert changed.count(("ml", "b")) == 2  # listed, then found gone; the unchanged job "a" is not woken again
    assert changed.count(("ml", "a")) == 1


def test_a_listing_of_one_watched_namespace_leaves_the_others_alone(monkeypatch, changed):
    server = Server(
        [[pod("a-worker-0", "a", "1", namespace="team-a")], [pod("a-worker-0", "a", "2", "team-b")], []], []
    )
    serve(monkeypatch, server)
    pods = Informer("Pod", LABEL_JOB, ["team-a", "team-b"], worker_view, changed.append)
    pods.list("team-a")
    pods.list("team-b")
    pods.list("team-a")  # team-a's pod is gone
    assert pods.get(("team-a", "a")) == [] and names(pods.get(("team-b", "a"))) == ["a-worker-0"]


def test_a_pod_found_gone_stays_out_of_the_index_until_the_watch_says_so(monkeypatch, changed):
    """A delete answered 404 while the watch lags: a late event about that pod must not bring it back."""
    worker = pod("a-worker-0", "a", "1")
    serve(monkeypatch, Server([[worker]], []))
    pods = Informer("Pod", LABEL_JOB, [], worker_view, changed.append)
    pods.list(None)
    pods.forget("ml", [worker["metadata"]["uid"]])
    assert pods.get(("ml", "a")) == []
    pods.apply({"type": "MODIFIED", "object": pod("a-worker-0", "a", "2", phase="Running")})
    assert pods.get(("ml", "a")) == []
    pods.apply({"type": "DELETED", "object": pod("a-worker-0", "a", "3")})
    # once its deletion is watched, the same uid would be indexed again (a test's shortcut: uids are never reused)
    pods.apply({"type": "ADDED", "object": pod("a-worker-0", "a", "4")})
    assert [p["metadata"]["uid"] for p in pods.get(("ml", "a"))] == [worker["metadata"]["uid"]]


def test_the_api_server_away_is_retried_and_the_watch_resumes_where_it_was(monkeypatch, changed):
    server = Server(
        [[]],
        [
            ([("ADDED", pod("a-worker-0", "a", "5"))], ConnectionResetError("connection reset by peer")),
            ([], None),
        ],
    )
    serve(monkeypatch, server)
    pods = server.informer = Informer("Pod", LABEL_JOB, [], worker_view, changed.append)
    pods.start()
    assert server.done.wait(10), server.requests
    assert [r for r in server.requests if r[0] == "list"] == [("list", None, None)]  # no new listing needed
    assert server.requests[2] == ("watch", None, "5")
    assert names(pods.get(("ml", "a"))) == ["a-worker-0"]


def config_map(name: str, job: str, data: dict[str, str], owner: str = "job-uid") -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": "ml",
            "uid": f"uid-{name}",
            "resourceVersion": "1",
            "labels": {LABEL_JOB: job},
            "ownerReferences": [{"uid": owner, "controller": True}],
        },
        "data": data,
    }


def test_only_a_jobs_progress_config_map_is_indexed_with_its_owner_and_report(caplog):
    report = '{"step": 7, "totalSteps": 10, "time": "2026-01-01T00:00:00Z"}'
    assert progress_view(config_map("a-trainer-config", "a", {"config.yaml": "x"})) is None
    key, progress = progress_view(config_map("a-progress", "a", {PROGRESS_KEY: report}))
    assert key == ("ml", "a") and progress.owner_uid == "job-uid" and progress.report.step == 7
    _, unreadable = progress_view(config_map("a-progress", "a", {PROGRESS_KEY: "{not json"}))
    assert unreadable.report is None and "holds no valid report" in caplog.text


def test_a_watch_stream_is_read_line_by_line_across_chunks_and_410_asks_for_a_listing():
    """The 410 itself cannot be caused on demand here: the API server's watch cache keeps every event of the
    last 75 s, so the stream the server sends then is written out as it arrives."""
    added = b'{"type":"ADDED","object":{"metadata":{"name":"a","resourceVersion":"5"}}}\n'
    expired = b'{"type":"ERROR","object":{"kind":"Status","code":410,"reason":"Expired","message":"too old"}}\n'
    stream = added[:10], added[10:] + b"\n" + expired[:7], expired[7:]
    events = kube.watch_events(iter(stream), "Pod")
    assert next(events)["object"]["metadata"]["resourceVersion"] == "5"
    with pytest.raises(kube.WatchExpired, match="too old"):
        next(events)
    forbidden = b'{"type":"ERROR","object":{"kind":"Status","code":403,"message":"pods is forbidden"}}\n'
    with pytest.raises(kube.ApiException, match="forbidden"):
        list(kube.watch_events(iter([forbidden]), "Pod"))


def test_a_watch_that_hears_nothing_for_too_long_shows_as_stalled(monkeypatch, changed):
    now = [1000.0]
    monkeypatch.setattr(informer.time, "monotonic", lambda: now[0])
    serve(monkeypatch, Server([[]], []))
    pods = Informer("Pod", LABEL_JOB, ["ml"], worker_view, changed.append)
    pods.list("ml")
    assert pods.stalled(limit=600) is None
    now[0] += 601
    assert "Pod watch of ml has heard nothing for 601s" in pods.stalled(limit=600)
    pods.apply({"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "9"}}})  # apply alone: not heard
    assert pods.stalled(limit=600) is not None


# --- watch_namespace_selector: the namespaces served follow a label ----------------------------------------------


def namespace_object(name: str, version: str = "1") -> dict[str, Any]:
    return {"metadata": {"name": name, "uid": f"uid-ns-{name}", "resourceVersion": version}}


class Cluster:
    """A scripted API server for selector mode: the labelled namespaces, pods per namespace, and namespaces where
    the operator may not list or watch (no RoleBinding yet). Each watch ends empty after a moment."""

    def __init__(self, labelled: list[str], pods: dict[str, list[dict]], forbidden: set[str]) -> None:
        self.labelled, self.pods, self.forbidden = labelled, pods, forbidden
        self.requests: list[tuple[str, str, str | None]] = []
        self.over = threading.Event()

    def list_objects(self, kind: str, namespace: str | None, selector: str) -> tuple[list[dict], str]:
        self.requests.append(("list", kind, namespace))
        if kind == "Namespace":
            return [namespace_object(name) for name in self.labelled], "1"
        self._refuse(kind, namespace)
        return (self.pods.get(namespace or "", []) if kind == "Pod" else []), "1"

    def watch(self, kind: str, namespace: str | None, selector: str, version: str) -> Iterator[dict[str, Any]]:
        self.requests.append(("watch", kind, namespace))
        self._refuse(kind, namespace)
        self.over.wait(0.02)
        return iter(())

    def _refuse(self, kind: str, namespace: str | None) -> None:
        if kind != "Namespace" and namespace in self.forbidden:
            raise kube.ApiException(status=kube.FORBIDDEN, reason=f"{kind.lower()}s is forbidden")

    def count(self, namespace: str) -> int:
        return sum(1 for _, _, ns in self.requests if ns == namespace)


def wait_until(condition: Callable[[], bool], seconds: float = 10) -> bool:
    """Poll a condition the informers' threads make true (at most `seconds`)."""
    deadline = threading.Event()
    timer = threading.Timer(seconds, deadline.set)
    timer.start()
    try:
        while not condition():
            if deadline.wait(0.01):
                return condition()
        return True
    finally:
        timer.cancel()


class Selected:
    """The three informers and Tenants as handlers.py wires them, on a scripted cluster."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cluster: Cluster) -> None:
        monkeypatch.setattr(kube, "list_objects", cluster.list_objects)
        monkeypatch.setattr(kube, "watch", cluster.watch)
        monkeypatch.setattr(informer, "FAILURE_BACKOFF_SECONDS", (0.02,))
        self.woken: list[tuple[str, str]] = []
        self.ready: list[str] = []
        self.informers = [
            Informer(kind, LABEL_JOB, [], view, self.woken.append)
            for kind, view in [("ConfigMap", progress_view), ("Pod", worker_view), ("FineTuneJob", job_view)]
        ]
        self.tenants = Tenants("finetune.dev/tenant=true", self.informers, self.ready.append)
        self.pods = self.informers[1]

    def serves(self, namespace: str) -> bool:
        return all(i.serves(namespace) for i in self.informers)

    def stop(self) -> None:
        self.tenants.stop()
        for i in self.informers:
            i.stop()


@pytest.fixture
def selected(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Selected, Cluster]]:
    cluster = Cluster(["team-a", "team-b"], {"team-a": [pod("a-worker-0", "a", "1", "team-a")]}, {"team-b"})
    under_test = Selected(monkeypatch, cluster)
    yield under_test, cluster
    under_test.stop()
    cluster.over.set()


def test_labelled_namespaces_are_served_once_all_three_informers_listed_them(selected):
    operator, cluster = selected
    operator.tenants.start()
    assert wait_until(lambda: operator.ready == ["team-a"]), operator.ready
    assert operator.serves("team-a") and names(operator.pods.get(("team-a", "a"))) == ["a-worker-0"]
    assert not operator.serves("team-b"), "forbidden there: not served"
    assert not operator.serves("kube-system") and cluster.count("kube-system") == 0, "unlabelled: never asked"


def test_a_namespace_labelled_before_its_role_binding_is_retried_reported_once_then_served(selected, caplog):
    """The 403 neither crashes nor wedges anything; once the RoleBinding exists the namespace is served, without a
    restart."""
    operator, cluster = selected
    operator.tenants.start()
    assert wait_until(lambda: cluster.count("team-b") >= 9), cluster.requests
    refusals = [r for r in caplog.records if "may not list" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].levelname == "WARNING", [r.getMessage() for r in refusals]
    assert "namespace team-b matches finetune.dev/tenant=true" in refusals[0].getMessage()
    assert "team-b" not in operator.ready
    cluster.forbidden.clear()  # the onboarding's RoleBinding
    assert wait_until(lambda: "team-b" in operator.ready), operator.ready
    assert operator.serves("team-b")


def test_a_served_namespace_that_becomes_forbidden_is_not_a_stalled_watch(monkeypatch, caplog):
    """/healthz: a watch refused by RBAC is answered, not silent, so the operator is not restarted for it."""
    now = [1000.0]
    monkeypatch.setattr(informer.time, "monotonic", lambda: now[0])
    cluster = Cluster(["team-b"], {}, set())
    operator = Selected(monkeypatch, cluster)
    try:
        operator.tenants.start()
        assert wait_until(lambda: operator.ready == ["team-b"])
        cluster.forbidden.add("team-b")  # its RoleBinding deleted
        assert wait_until(lambda: any("may not list" in r.getMessage() for r in caplog.records))
        now[0] += 601
        seen = len(cluster.requests)
        assert wait_until(lambda: len(cluster.requests) >= seen + 9)  # refused again, after the clock moved
        assert [i.stalled(limit=600) for i in operator.informers] == [None, None, None]
        assert sum("may not list" in r.getMessage() for r in caplog.records) == 1
    finally:
        operator.stop()
        cluster.over.set()


def test_a_namespace_whose_label_goes_is_dropped_without_waking_its_jobs_and_comes_back(selected):
    operator, _ = selected
    operator.tenants.start()
    assert wait_until(lambda: "team-a" in operator.ready)
    operator.woken.clear()
    operator.tenants.namespaces.apply({"type": "DELETED", "object": namespace_object("team-a", "2")})  # label removed
    assert not any(i.serves("team-a") for i in operator.informers)
    assert operator.pods.get(("team-a", "a")) == [] and operator.woken == []
    operator.tenants.namespaces.apply({"type": "ADDED", "object": namespace_object("team-a", "3")})  # labelled again
    assert wait_until(lambda: operator.ready.count("team-a") == 2), operator.ready
    assert names(operator.pods.get(("team-a", "a"))) == ["a-worker-0"]


def test_a_listing_under_way_when_its_namespace_is_dropped_indexes_nothing(monkeypatch, changed):
    serve(monkeypatch, Server([[pod("a-worker-0", "a", "1", "team-a")]], []))
    pods = Informer("Pod", LABEL_JOB, [], worker_view, changed.append)
    dropped = threading.Event()
    dropped.set()  # unserve() set the stop of the thread that was listing
    pods.list("team-a", dropped)
    assert pods.get(("team-a", "a")) == [] and not pods.serves("team-a") and changed == []


def test_a_deleted_worker_is_kept_only_while_its_last_state_says_a_disruption_took_it(monkeypatch, changed):
    def marked(name: str, version: str, phase: str = "Running") -> dict[str, Any]:
        taken = pod(name, "a", version, phase=phase)
        taken["status"]["conditions"] = [
            {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}
        ]
        return taken

    serve(monkeypatch, Server([[pod(f"a-worker-{rank}", "a", "1") for rank in range(4)]], []))
    pods = Informer("Pod", LABEL_JOB, [], worker_view, changed.append, keep_deleted=taken_by_disruption)
    pods.list(None)
    pods.forget("ml", ["uid-ml-a-worker-3"])  # the operator's own delete answered 404 first
    for event in (
        marked("a-worker-0", "2"),  # evicted while training: kept
        pod("a-worker-1", "a", "3", phase="Running"),  # deleted with no mark: gone
        marked("a-worker-2", "4", phase="Succeeded"),  # its trainer had finished: nothing to restart
        marked("a-worker-3", "5"),  # found gone already: stays out
    ):
        pods.apply({"type": "DELETED", "object": event})
    (kept,) = pods.get(("ml", "a"))
    assert kept["metadata"]["name"] == "a-worker-0" and kept[DEPARTED] is True
    pods.forget("ml", ["uid-ml-a-worker-0"])  # the pass that read it
    assert pods.get(("ml", "a")) == []
