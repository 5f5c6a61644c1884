"""The pod's elastic agent (restartPolicy.strategy InPlace): a failed training process restarts the gang's
processes inside their pods instead of the operator recreating the pods.

Each pod runs torch.distributed.elastic's LocalElasticAgent (what torchrun runs) over a c10d rendezvous hosted by
pod 0's agent at MASTER_PORT. When a worker fails, its agent stops its other workers and joins the rendezvous's next
round; every other agent sees the waiting node (or its own workers failing on the dead peer) and does the same, so
the whole gang starts again and resumes from the latest checkpoint. What the subclass adds to torchrun's agent:
exit 2 (permanent) and 143 (stopped) are never restarted; every restart counts against one gang-wide budget
(FINETUNE_MAX_IN_PLACE_RESTARTS) with the operator's backoff; the failing agent records what failed in the round's
store, and pod 0's agent hands the gang's restarts to its workers, whose rank 0 reports them (ProgressReport).

The training processes are forked from a fork server that imported torch, transformers and the trainer once, so a
restart costs no interpreter start nor imports (seconds each); the server never touches CUDA.

Ranks are today's: the rendezvous orders nodes by their address, so pod 0 publishes MASTER_ADDR (the address its
workers' store is reached at) and pod k an address that sorts after it in node order and is never dialled.
"""

from __future__ import annotations

import importlib
import json
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.elastic.agent.server.api import RunResult, WorkerGroup, WorkerSpec, WorkerState
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
from torch.distributed.elastic.multiprocessing.api import MultiprocessContext, _terminate_process_handler
from torch.distributed.elastic.rendezvous import RendezvousParameters
from torch.distributed.elastic.rendezvous.api import RendezvousClosedError, RendezvousError
from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler

from .config import ConfigError
from .contract import (
    MAX_IN_PLACE_RESTARTS_ENV,
    MAX_RESTART_BACKOFF_ENV,
    RESTART_BACKOFF_ENV,
    RESTARTS_SPENT_ENV,
    RUN_ID_ENV,
    TERMINATION_LOG_ENV,
    ExitCode,
    InPlaceRestart,
    exit_code_of,
    restart_backoff,
)
from .contract import termination_message as one_line_message
from .distributed import (
    DEFAULT_RENDEZVOUS_TIMEOUT_S,
    WORKER_STOP_GRACE_S,
    LaunchEnv,
    RendezvousTimeout,
    StoppedWhileWaiting,
    cpu_threads_per_worker,
    pod_exit_code,
    seconds_from_env,
    wait_for_master,
)
from .metrics import IN_PLACE_RESTARTS_ENV

log = logging.getLogger(__name__)

MONITOR_INTERVAL_S = 0.2  # how often the agent looks at its workers: most of the detection latency
RESTART_STOP_GRACE_S = 5  # a gang restart's survivors cannot checkpoint (a peer is gone): no long goodbye
FAILURE_KEY = "finetune/failure/{group_rank}"  # in the failed round's store: what failed on that node
RECORD_MESSAGE_MAX_CHARS = 500
# What the agent's fork server imports once, so that a restarted training process starts in a fraction of a second:
# a fresh interpreter spends seconds importing torch, transformers and peft (more than the rest of a restart).
# transformers.modeling_utils is most of what loading any architecture imports.
WORKER_PRELOAD = [
    "finetune_trainer.loop",
    "finetune_trainer.progress_configmap",
    "finetune_trainer.prometheus",
    "transformers.modeling_utils",
    "peft",
]

# What a gang does after a worker failed.
RESTART, PERMANENT, STOPPED = "restart", "permanent", "stopped"


@dataclass(frozen=True)
class AgentSettings:
    """What the operator tells a pod's agent (contract.RESTART_ENV) and how long the gang may take to meet."""

    run_id: str
    max_restarts: int  # in-place restarts this gang attempt may still make
    restarts_spent: int  # the job's restarts before this attempt: the backoff goes on from there
    backoff_seconds: int
    max_backoff_seconds: int
    rendezvous_timeout_s: float

    def backoff(self, restart: int) -> int:
        """Seconds before this attempt's in-place restart number `restart` (1-based)."""
        return restart_backoff(self.backoff_seconds, self.max_backoff_seconds, self.restarts_spent + restart)


def agent_settings_from_environ(environ: Mapping[str, str]) -> AgentSettings:
    def integer(name: str, default: int) -> int:
        raw = environ.get(name) or ""
        try:
            value = int(raw) if raw else default
        except ValueError as e:
            raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from e
        if value < 0:
            raise ConfigError(f"environment variable {name}={raw!r} must not be negative")
        return value

    backoff = integer(RESTART_BACKOFF_ENV, 0)
    return AgentSettings(
        run_id=environ.get(RUN_ID_ENV) or "finetune",
        max_restarts=integer(MAX_IN_PLACE_RESTARTS_ENV, 3),
        restarts_spent=integer(RESTARTS_SPENT_ENV, 0),
        backoff_seconds=backoff,
        max_backoff_seconds=integer(MAX_RESTART_BACKOFF_ENV, max(backoff, 300)),
        rendezvous_timeout_s=seconds_from_env("FINETUNE_RENDEZVOUS_TIMEOUT", DEFAULT_RENDEZVOUS_TIMEOUT_S, environ),
    )


def node_address(env: LaunchEnv) -> str:
    """The address this node takes part in the rendezvous with. The rendezvous ranks nodes by it, so pod k must sort
    k-th: pod 0 gives MASTER_ADDR (its workers' store is published at it, so every pod must reach it), pod k an
    address after it that nobody dials ('~' sorts after every character of a DNS name or an IP address)."""
    return env.master_addr if env.node_rank == 0 else f"{env.master_addr}~{env.node_rank:05d}"


def rendezvous_parameters(env: LaunchEnv, settings: AgentSettings) -> RendezvousParameters:
    """c10d rendezvous at MASTER_ADDR:MASTER_PORT, hosted by pod 0's agent, which reaches it over loopback (its own
    DNS name may not resolve yet); all NNODES pods, always."""
    host = env.node_rank == 0
    return RendezvousParameters(
        backend="c10d",
        endpoint=f"{'127.0.0.1' if host else env.master_addr}:{env.master_port}",
        run_id=settings.run_id,
        min_nodes=env.nnodes,
        max_nodes=env.nnodes,
        local_addr=node_address(env),
        is_host=host,
        join_timeout=int(settings.rendezvous_timeout_s),
    )


def gang_outcome(exit_codes: Sequence[int]) -> str:
    """What a round's failed workers (their exit codes as a container runtime reports them) mean for the gang: a
    permanent error is never retried, and workers that all stopped on request (a peer's SIGTERM) are not failures."""
    if ExitCode.PERMANENT in exit_codes:
        return PERMANENT
    if exit_codes and all(code == ExitCode.STOPPED for code in exit_codes):
        return STOPPED
    return RESTART


def describe_exit(code: int) -> str:
    """'exited 137 (SIGKILL)', 'exited 1'."""
    if code > 128:
        try:
            return f"exited {code} ({signal.Signals(code - 128).name})"
        except ValueError:
            pass
    return f"exited {code}"


def telling(record: Mapping[str, Any]) -> tuple[int, float, int]:
    """Sorts a round's failures, the one that explains it best first: a signal or an unusual exit code before
    exit 1 (what a rank whose peer died exits with), before 143 (stopped by its own agent); then the earliest
    seen, the lowest rank."""
    code = record.get("exitCode")
    plainness = 2 if code == ExitCode.STOPPED else 1 if code == ExitCode.RETRYABLE else 0
    return plainness, float(record.get("seenAt", 0.0)), int(record.get("rank") or 0)


def most_telling(records: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    return min(records, key=telling, default=None)


def failure_record(rank: int, exit_code: int, message: str | None, seen_at: float) -> dict[str, Any]:
    """An InPlaceRestart's fields (its index is pod 0's to give), plus when the failure was seen."""
    fields = InPlaceRestart(index=1, pod=socket.gethostname(), rank=rank, exit_code=exit_code, message=message)
    return {**fields.model_dump(by_alias=True, exclude={"index"}), "seenAt": seen_at}


class RestartsExhausted(RuntimeError):
    """A peer's agent started a round past the gang's budget."""


def train_worker(config_path: str) -> None:
    """A training process of the gang, forked from the agent's fork server; its exit code is the trainer's."""
    from .entrypoint import run

    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit():  # OpenMP read the fork server's env when torch was imported there
        torch.set_num_threads(int(threads))
    sys.exit(run(config_path))


class GangAgent(LocalElasticAgent):
    """torchrun's agent, with the operator's restart semantics (module docstring)."""

    def __init__(self, spec: WorkerSpec, settings: AgentSettings, scratch: Path, environ: Mapping[str, str]):
        super().__init__(
            spec=spec,
            logs_specs=DefaultLogsSpecs(log_dir=str(scratch / "torchelastic")),
            start_method="forkserver",  # never CUDA in the server, unlike forking this process
            shutdown_timeout=WORKER_STOP_GRACE_S,
        )
        self.settings = settings
        self.scratch = scratch
        self.environ = environ
        self.gang_restarts = 0  # rounds after the first: every agent of the gang counts each one
        self.outcome = RESTART
        self.failure: dict[str, Any] | None = None  # this node's latest failure, as recorded for the gang
        self.in_place_restarts: list[InPlaceRestart] = []  # pod 0: the gang's, numbered

    def termination_log(self, local_rank: int) -> Path:
        """Each worker's own, per round, so a message is never the previous round's."""
        return self.scratch / f"termination-{self.gang_restarts}-{local_rank}.log"

    def worker_message(self, local_rank: int) -> str | None:
        path = self.termination_log(local_rank)
        if not path.exists():
            return None
        return path.read_text().strip() or None

    def worker_exit_codes(self) -> list[int]:
        """The exit codes of this round's workers, once stopped; none between rounds (the last round's are spent)."""
        context = self._pcontext
        if not isinstance(context, MultiprocessContext) or context._pc is None:
            return []
        if self._worker_group.state == WorkerState.STOPPED:
            return []
        return [process.exitcode for process in context._pc.processes if process.exitcode is not None]

    def _set_local_rank_env(self, worker_env: dict[str, str | None], local_rank: int, spec: WorkerSpec) -> None:
        super()._set_local_rank_env(worker_env, local_rank, spec)
        worker_env[TERMINATION_LOG_ENV] = str(self.termination_log(local_rank))
        worker_env["FINETUNE_LOCAL_WORKER"] = "1"  # every worker writes its own termination log
        worker_env[IN_PLACE_RESTARTS_ENV] = json.dumps([r.model_dump(by_alias=True) for r in self.in_place_restarts])
        if self._worker_group.group_rank == 0:
            worker_env["MASTER_ADDR"] = "127.0.0.1"  # the store of rank 0's process group is in this pod
        threads = cpu_threads_per_worker(self.environ, spec.local_world_size)
        if threads is not None:
            worker_env["OMP_NUM_THREADS"] = threads

    def _monitor_workers(self, worker_group: WorkerGroup) -> RunResult:
        result = super()._monitor_workers(worker_group)
        if result.state == WorkerState.FAILED and result.failures:
            codes = {rank: exit_code_of(failure.exitcode) for rank, failure in result.failures.items()}
            self.outcome = gang_outcome(list(codes.values()))
            if self.outcome != RESTART:
                self._remaining_restarts = 0
            seen_at = time.time()
            records = [
                failure_record(rank, codes[rank], self.worker_message(failure.local_rank), seen_at)
                for rank, failure in result.failures.items()
            ]
            self.failure = min(records, key=telling)
        return result

    def _stop_workers(self, worker_group: WorkerGroup) -> None:
        self._shutdown(timeout=RESTART_STOP_GRACE_S)

    def _restart_workers(self, worker_group: WorkerGroup) -> None:
        """Stop this node's workers, wait the backoff and meet the gang in the next round. Called for this node's
        failure and for a peer's (a node waiting in the rendezvous): the gang restarts once either way."""
        if self.gang_restarts >= self.settings.max_restarts:  # a peer restarts past the budget: never
            raise RestartsExhausted(
                f"the gang restarted more often than its {self.settings.max_restarts} in-place restarts"
            )
        self.gang_restarts += 1
        self._remaining_restarts = max(self.settings.max_restarts - self.gang_restarts, 0)
        delay = self.settings.backoff(self.gang_restarts)
        when = f"restart {self.gang_restarts} of {self.settings.max_restarts}, in {delay} s"
        if self.failure is not None:
            self.publish_failure()
            log.warning("%s: restarting the gang in place, %s", describe_failure(self.failure), when)
        else:
            log.warning("a process of another pod failed: restarting the gang in place, %s", when)
        self.failure = None
        self._stop_workers(worker_group)
        worker_group.state = WorkerState.STOPPED
        time.sleep(delay)
        self._initialize_workers(worker_group)

    def _rendezvous(self, worker_group: WorkerGroup) -> None:
        failed_round = self._store  # None at the first round
        super()._rendezvous(worker_group)
        if failed_round is not None and worker_group.group_rank == 0:
            # Every node records its failure before it joins the next round, so all records are in by now.
            record = most_telling(read_failures(failed_round, worker_group.group_world_size))
            fields = {k: v for k, v in (record or {}).items() if k != "seenAt"}
            fields["message"] = _shortened(fields.get("message"))
            self.in_place_restarts.append(InPlaceRestart.model_validate({**fields, "index": self.gang_restarts}))

    def publish_failure(self) -> None:
        """Record this node's failure in the current round's store, for pod 0's agent and the gang's peers."""
        store = self._worker_group.store
        if self.failure is None or store is None:
            return
        try:
            store.set(FAILURE_KEY.format(group_rank=self._worker_group.group_rank), json.dumps(self.failure))
        except (RuntimeError, OSError) as e:  # the store's host is gone: the record is lost, the restart is not
            log.warning("could not record the failure in the rendezvous store: %s", e)


def read_failures(store: Any, group_world_size: int) -> list[dict[str, Any]]:
    """The failures the nodes recorded in one round's store."""
    records = []
    for group_rank in range(group_world_size):
        key = FAILURE_KEY.format(group_rank=group_rank)
        try:
            if store.check([key]):
                records.append(json.loads(store.get(key)))
        except (RuntimeError, OSError, ValueError) as e:
            log.warning("could not read node %d's failure record: %s", group_rank, e)
    return records


def describe_failure(record: Mapping[str, Any]) -> str:
    """'rank 1 (pod job-worker-1) exited 137 (SIGKILL)'."""
    return f"rank {record.get('rank')} (pod {record.get('pod')}) {describe_exit(int(record.get('exitCode', 1)))}"


def _shortened(message: str | None) -> str | None:
    return one_line_message(message)[:RECORD_MESSAGE_MAX_CHARS] if message else None


def run_agent(config_path: str, env: LaunchEnv, environ: Mapping[str, str] = os.environ) -> tuple[int, str | None]:
    """Run this pod's share of the gang under the elastic agent to the end; return (exit code, termination message).

    Exit codes: 0 when the gang finished; 2 at a permanent error; 143 on SIGTERM (forwarded to the workers, which
    checkpoint) or when the workers stopped on a peer's request; else the failed worker's code once the in-place
    restarts are spent (or 1 when the gang could not meet again).
    """
    settings = agent_settings_from_environ(environ)
    stopping = False

    def stop_waiting(_signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, stop_waiting) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        if env.node_rank != 0:  # pods start minutes apart: wait for pod 0's rendezvous before joining it
            wait_for_master(
                env.master_addr, env.master_port, settings.rendezvous_timeout_s, should_stop=lambda: stopping
            )
        for s in previous:  # from now on a signal stops the agent wherever it is (torchrun's handler)
            signal.signal(s, _terminate_process_handler)
        with tempfile.TemporaryDirectory(prefix="finetune-agent-") as scratch:
            return _run_gang(config_path, env, settings, Path(scratch), environ)
    except StoppedWhileWaiting as e:
        return ExitCode.STOPPED, f"{e}; nothing trained yet"
    except SignalException as e:  # before the agent ran
        return ExitCode.STOPPED, f"stopped by {signal.Signals(e.sigval).name} before the gang met; nothing trained yet"
    except RendezvousTimeout as e:
        return ExitCode.RETRYABLE, f"error (retryable): {e}"
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _warm_up_torch_logging() -> None:
    """torch's log formatter imports torch._dynamo (seconds) the first time it formats an exception, which the
    agent does as a worker fails: import it now, beside the gang's start, not on a restart's path. A daemon: a
    SIGTERM that interrupts an import in the main thread can leave that module's lock taken, and an exit must not
    wait for a thread stuck on it."""
    threading.Thread(target=importlib.import_module, args=("torch._dynamo",), name="warm-up", daemon=True).start()


def _run_gang(
    config_path: str, env: LaunchEnv, settings: AgentSettings, scratch: Path, environ: Mapping[str, str]
) -> tuple[int, str | None]:
    # Rank 0's worker hosts its process group's store on a fresh port each round (reached over loopback in its
    # pod) rather than all rounds sharing the agent's, where the previous round's workers left their keys.
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    multiprocessing.get_context("forkserver").set_forkserver_preload(WORKER_PRELOAD)
    # Should an import in the fork server ask whether CUDA is there, NVML answers (fork-safe), not the CUDA driver,
    # whose state a forked process cannot use.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    multiprocessing.forkserver.ensure_running()  # its imports overlap the wait for the other pods
    _warm_up_torch_logging()
    parameters = rendezvous_parameters(env, settings)
    log.info(
        "elastic agent of node %d of %d: %d worker process(es), rendezvous %s (run %s), %d in-place restart(s) left",
        env.node_rank,
        env.nnodes,
        env.nproc_per_node,
        parameters.endpoint,
        settings.run_id,
        settings.max_restarts,
    )
    try:
        rendezvous = get_rendezvous_handler(parameters)
    except RendezvousError as e:
        return ExitCode.RETRYABLE, f"error (retryable): cannot reach the gang's rendezvous: {e}"
    spec = WorkerSpec(
        role="trainer",
        local_world_size=env.nproc_per_node,
        entrypoint=train_worker,
        args=(config_path,),
        rdzv_handler=rendezvous,
        max_restarts=settings.max_restarts,
        monitor_interval=MONITOR_INTERVAL_S,
        local_addr=node_address(env),
    )
    agent = GangAgent(spec, settings, scratch, environ)
    close_rendezvous = True
    try:
        return _outcome(agent, agent.run())
    except SignalException as e:
        close_rendezvous = False  # as torchrun: a pod that goes is not the end of the rendezvous
        codes = agent.worker_exit_codes()
        code = pod_exit_code(codes, stopping=True) if codes else ExitCode.STOPPED
        messages = (agent.worker_message(i) for i in range(env.nproc_per_node))
        return code, next((m for m in messages if m), f"stopped by {signal.Signals(e.sigval).name}")
    except RendezvousClosedError:
        return _closed_by_peer(agent)
    except RestartsExhausted as e:
        return ExitCode.RETRYABLE, f"error (retryable): {e}"
    except RendezvousError as e:
        return ExitCode.RETRYABLE, f"error (retryable): the gang did not meet again: {type(e).__name__}: {e}"
    finally:
        if close_rendezvous:
            _close(rendezvous)


def _close(rendezvous: Any) -> None:
    """End the rendezvous, so that the peers' agents stop waiting for this pod (they read why in the store)."""
    try:
        rendezvous.shutdown()
    except (RendezvousError, RuntimeError, OSError) as e:  # its host is gone already
        log.warning("could not close the rendezvous: %s", e)


def _outcome(agent: GangAgent, result: RunResult | None) -> tuple[int, str | None]:
    if result is None:  # the rendezvous ended the run (torch's graceful exit)
        return _closed_by_peer(agent)
    if not result.is_failed():
        return ExitCode.DONE, agent.worker_message(0)
    failure = agent.failure
    if failure is None:  # no worker failed: torch found one stuck in uninterruptible sleep
        return ExitCode.RETRYABLE, "error (retryable): a training process hung in uninterruptible sleep (D state)"
    agent.publish_failure()  # the peers' agents, stopped by the closed rendezvous, read why
    code = int(failure.get("exitCode", ExitCode.RETRYABLE))
    if agent.outcome == RESTART:
        log.error(
            "%s: no in-place restart left (%d of %d spent)",
            describe_failure(failure),
            agent.gang_restarts,
            agent.settings.max_restarts,
        )
    return code, failure.get("message") or f"error (retryable): {describe_failure(failure)}"


def _closed_by_peer(agent: GangAgent) -> tuple[int, str | None]:
    """A peer's agent ended the gang (a permanent error, a stop, no restart left): exit as its failure says."""
    group = agent.get_worker_group()
    record = most_telling(read_failures(group.store, group.group_world_size)) if group.store is not None else None
    if record is None:
        return ExitCode.RETRYABLE, "error (retryable): another pod's agent ended the gang"
    text = f"the gang stopped: {describe_failure(record)}"
    if record.get("message"):
        text = f"{text}: {record['message']}"
    return int(record.get("exitCode", ExitCode.RETRYABLE)), text
