"""The elastic agent's pure parts: node addresses and ranks, settings, what a failure means, which one tells most,
and what every progress report says of the gang."""

from __future__ import annotations

import json

import pytest

from finetune_trainer.config import ConfigError
from finetune_trainer.contract import InPlaceRestart
from finetune_trainer.distributed import LaunchEnv
from finetune_trainer.elastic import (
    PERMANENT,
    RESTART,
    STOPPED,
    AgentSettings,
    agent_settings_from_environ,
    describe_exit,
    gang_outcome,
    most_telling,
    node_address,
    rendezvous_parameters,
)
from finetune_trainer.metrics import IN_PLACE_RESTARTS_ENV, gang_fields

MASTER = "job-worker-0.job.ns.svc"


def pod(node_rank: int, nnodes: int = 12) -> LaunchEnv:
    return LaunchEnv(node_rank=node_rank, nnodes=nnodes, master_addr=MASTER, master_port=29500)


SETTINGS = AgentSettings("uid-1", 3, 0, 10, 300, 600.0)


@pytest.mark.parametrize("master", [MASTER, "127.0.0.1", "10.1.2.3", "fd00::1"])
def test_the_rendezvous_orders_the_nodes_as_the_operator_numbered_them(master):
    """The dynamic rendezvous ranks nodes by sorting their addresses: pod k must come k-th, up to 99999 pods."""
    pods = [LaunchEnv(node_rank=k, nnodes=12, master_addr=master) for k in (0, 1, 2, 9, 10, 11)]
    addresses = [node_address(env) for env in pods]
    assert addresses[0] == master and sorted(addresses) == addresses


def test_pod_0_hosts_the_rendezvous_on_loopback_and_the_others_dial_master_addr():
    host, other = rendezvous_parameters(pod(0), SETTINGS), rendezvous_parameters(pod(3), SETTINGS)
    assert (host.endpoint, host.get_as_bool("is_host"), host.local_addr) == ("127.0.0.1:29500", True, MASTER)
    assert (other.endpoint, other.get_as_bool("is_host")) == (f"{MASTER}:29500", False)
    for params in (host, other):
        assert (params.backend, params.run_id, params.min_nodes, params.max_nodes) == ("c10d", "uid-1", 12, 12)
        assert params.get_as_int("join_timeout") == 600


def test_settings_from_the_operators_env():
    environ = {
        "FINETUNE_RUN_ID": "uid-2",
        "FINETUNE_MAX_IN_PLACE_RESTARTS": "2",
        "FINETUNE_RESTARTS_SPENT": "1",
        "FINETUNE_RESTART_BACKOFF_SECONDS": "10",
        "FINETUNE_MAX_RESTART_BACKOFF_SECONDS": "30",
        "FINETUNE_RENDEZVOUS_TIMEOUT": "90",
    }
    settings = agent_settings_from_environ(environ)
    assert settings == AgentSettings("uid-2", 2, 1, 10, 30, 90.0)
    # The backoff goes on from the job's restarts before this attempt, doubling, capped.
    assert [settings.backoff(restart) for restart in (1, 2, 3)] == [20, 30, 30]


@pytest.mark.parametrize(
    ("name", "value"), [("FINETUNE_MAX_IN_PLACE_RESTARTS", "two"), ("FINETUNE_RESTARTS_SPENT", "-1")]
)
def test_a_bad_setting_names_the_variable(name, value):
    with pytest.raises(ConfigError, match=name):
        agent_settings_from_environ({name: value})


@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        ([137], RESTART),
        ([1, 143], RESTART),  # a crash; the other local worker stopped by the agent
        ([2, 143], PERMANENT),
        ([2], PERMANENT),
        ([143], STOPPED),  # stopped on a peer's request: checkpointed, not a failure
        ([143, 143], STOPPED),
    ],
)
def test_gang_outcome(codes, expected):
    assert gang_outcome(codes) == expected


def test_describe_exit():
    assert [describe_exit(code) for code in (137, 1, 2, 255)] == [
        "exited 137 (SIGKILL)",
        "exited 1",
        "exited 2",
        "exited 255",
    ]


def record(rank: int, exit_code: int, seen_at: float) -> dict:
    return {"rank": rank, "exitCode": exit_code, "seenAt": seen_at}


@pytest.mark.parametrize(
    ("records", "expected_rank"),
    [
        ([record(0, 1, 1.0), record(1, 137, 2.0)], 1),  # a signal beats the exit 1 of a rank whose peer died
        ([record(0, 143, 1.0), record(1, 1, 2.0)], 1),  # exit 1 beats a worker its own agent stopped
        ([record(0, 1, 2.0), record(1, 1, 1.0)], 1),  # else the earliest
        ([record(3, 139, 1.0), record(2, 137, 1.0)], 2),  # else the lowest rank
    ],
)
def test_most_telling_failure(records, expected_rank):
    assert most_telling(records)["rank"] == expected_rank


def test_no_record_tells_nothing():
    assert most_telling([]) is None


def test_every_report_names_the_attempt_and_its_in_place_restarts():
    restarts = [InPlaceRestart(index=1, pod="job-worker-1", rank=1, exit_code=137)]
    environ = {
        "FINETUNE_ATTEMPT": "4",
        IN_PLACE_RESTARTS_ENV: json.dumps([r.model_dump(by_alias=True) for r in restarts]),
    }
    assert gang_fields(environ) == {"attempt": 4, "in_place_restarts": restarts}
    assert gang_fields({}) == {"attempt": None, "in_place_restarts": []}
    assert gang_fields({IN_PLACE_RESTARTS_ENV: "not json"})["in_place_restarts"] == []
