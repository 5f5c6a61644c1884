"""kube.py: credentials read at most once a minute (through the client's refresh hook); the pause in pod creates."""

from __future__ import annotations

import kubernetes
import pytest

from finetune_operator import kube


def test_credentials_are_read_once_a_minute_and_a_rotated_token_is_used_after_that(monkeypatch):
    token = ["first"]  # the token file's content
    reads = []

    def refresh(configuration: kubernetes.client.Configuration) -> None:  # as the kubeconfig loaders install
        reads.append(1)
        configuration.api_key["BearerToken"] = f"Bearer {token[0]}"

    configuration = kubernetes.client.Configuration(api_key={"BearerToken": "Bearer first"})
    configuration.refresh_api_key_hook = refresh
    client = kubernetes.client.ApiClient(configuration)
    now = [1000.0]
    monkeypatch.setattr(kube.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(kube, "_credentials", (-kube.AUTH_REFRESH_SECONDS, {}))

    assert kube._auth_headers(client) == {"authorization": "Bearer first"}
    token[0] = "rotated"
    now[0] += kube.AUTH_REFRESH_SECONDS - 1
    assert kube._auth_headers(client) == {"authorization": "Bearer first"}
    assert len(reads) == 1  # not once per request
    now[0] += 1
    assert kube._auth_headers(client) == {"authorization": "Bearer rotated"}
    assert len(reads) == 2


def test_background_work_waits_for_a_pause_in_pod_creates_and_no_longer_than_at_most():
    now = [100.0]

    def sleep(seconds: float) -> None:
        now[0] = round(now[0] + seconds, 6)  # a clock's resolution

    creates = kube.PodCreates(pause=0.3, at_most=10.0, clock=lambda: now[0], sleep=sleep)
    creates.wait_for_pause(since=now[0])
    assert now[0] == 100.0  # no pod create yet: at once
    with creates.creating():
        creates.wait_for_pause(since=now[0])  # a create in flight all along: until at_most
        assert now[0] == pytest.approx(110.0)
    creates.wait_for_pause(since=now[0])  # the create just ended: for the pause
    assert now[0] == pytest.approx(110.3)
    creates.wait_for_pause(since=now[0])  # paused long enough already
    assert now[0] == pytest.approx(110.3)
