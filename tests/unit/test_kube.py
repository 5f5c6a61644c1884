"""kube.py's credentials: read through the client's own refresh hook, at most once a minute."""

from __future__ import annotations

import kubernetes

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
