"""Distributed wiring: read the pod's torchrun-style env, start one process per GPU, wait for rank 0, init.

The operator sets, per pod, MASTER_ADDR, MASTER_PORT, WORLD_SIZE (all processes), NNODES (pods),
NODE_RANK, NPROC_PER_NODE and RANK, plus PET_* copies. With NPROC_PER_NODE > 1 this module starts that
many worker processes in the pod (global rank NODE_RANK * NPROC_PER_NODE + LOCAL_RANK) and forwards
SIGTERM to them (under the InPlace restart strategy elastic.py's agent starts them instead). A process
started by torchrun or that agent (LOCAL_RANK set) uses torchrun's env as is; no env at all
means one process. Collectives of the training loop's bookkeeping (token counts, the stop flag, RNG
states) run on a gloo group on CPU, so they never synchronise a GPU.

Tunables (env): FINETUNE_RENDEZVOUS_TIMEOUT (s, default 600) bounds the wait for rank 0 and the store;
FINETUNE_COLLECTIVE_TIMEOUT (s, default 1800; the operator sets half the job's progress deadline) bounds
every collective, so a gang with a dead or hung peer fails in the pod before the operator calls it stalled.
Without torchrun's agent, the process group's keys in rank 0's store carry FINETUNE_RUN_ID (job uid and
attempt), so a process of an older attempt that reaches the new rank 0 cannot take a rank in the new gang.
On CUDA, NCCL's async error handling, PyTorch's flight recorder (dumped into the run folder on a collective
timeout) and NCCL's warnings are on unless the env says otherwise (nccl_environ).
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .config import ConfigError
from .contract import (
    COLLECTIVE_TIMEOUT_ENV,
    DEFAULT_COLLECTIVE_TIMEOUT_SECONDS,
    GPUS_PER_WORKER_ENV,
    RUN_ID_ENV,
    TERMINATION_LOG_ENV,
    ExitCode,
    exit_code_of,
)

log = logging.getLogger(__name__)

DEFAULT_RENDEZVOUS_TIMEOUT_S = 600
WORKER_STOP_GRACE_S = 25  # within Kubernetes' default 30 s termination grace period


class RendezvousTimeout(RuntimeError):
    """Rank 0 never became reachable; retryable (the next attempt may find it)."""


class StoppedWhileWaiting(Exception):
    """A stop was requested (SIGTERM) while waiting for rank 0: nothing was trained, nothing to save."""


@dataclass(frozen=True)
class LaunchEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    nnodes: int = 1
    nproc_per_node: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    under_torchrun: bool = False  # torchrun's agent hosts the rendezvous store
    worker_process: bool = False  # LOCAL_RANK is set: started by torchrun or by launch_local_workers

    @property
    def needs_local_launch(self) -> bool:
        """This pod must start nproc_per_node processes itself."""
        return not self.worker_process and self.nproc_per_node > 1


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name) or environ.get(f"PET_{name}")
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as e:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from e


def _nproc_per_node(environ: Mapping[str, str]) -> int:
    raw = environ.get("NPROC_PER_NODE") or environ.get("PET_NPROC_PER_NODE") or "1"
    if raw in ("auto", "gpu"):  # torchrun's symbolic values
        return max(1, torch.cuda.device_count())
    if raw == "cpu":
        return 1
    return _env_int({"NPROC_PER_NODE": raw}, "NPROC_PER_NODE", 1) or 1


def launch_env_from_environ(environ: Mapping[str, str] = os.environ) -> LaunchEnv:
    """Parse the distributed env (the operator's, torchrun's, or none); raise ConfigError on nonsense."""
    nproc = _nproc_per_node(environ)
    nnodes = _env_int(environ, "NNODES", 1)
    node_rank = _env_int(environ, "NODE_RANK", 0)
    addr = environ.get("MASTER_ADDR") or environ.get("PET_MASTER_ADDR") or "127.0.0.1"
    port = _env_int(environ, "MASTER_PORT", 29500)
    common = LaunchEnv(  # what every case shares; each case below sets its ranks and sizes
        node_rank=node_rank,
        nnodes=nnodes,
        nproc_per_node=nproc,
        master_addr=addr,
        master_port=port,
        under_torchrun="TORCHELASTIC_RUN_ID" in environ,
    )
    if environ.get("LOCAL_RANK") not in (None, ""):
        env = replace(
            common,
            rank=_env_int(environ, "RANK", 0),
            world_size=_env_int(environ, "WORLD_SIZE", 1),
            local_rank=_env_int(environ, "LOCAL_RANK", 0),
            local_world_size=_env_int(environ, "LOCAL_WORLD_SIZE", nproc),
            worker_process=True,
        )
    elif nproc > 1:
        env = replace(common, world_size=_env_int(environ, "WORLD_SIZE", nnodes * nproc), local_world_size=nproc)
        if env.world_size != nnodes * nproc:
            raise ConfigError(f"WORLD_SIZE={env.world_size} does not equal NNODES={nnodes} x NPROC_PER_NODE={nproc}")
    else:
        env = replace(
            common, rank=_env_int(environ, "RANK", node_rank), world_size=_env_int(environ, "WORLD_SIZE", nnodes)
        )
    if not 0 <= env.rank < env.world_size:
        raise ConfigError(f"RANK={env.rank} is outside WORLD_SIZE={env.world_size}")
    return env


# --- the GPUs asked for ------------------------------------------------------------------------------


def missing_gpus_message(
    requested: int, processes: int, devices: int, torch_cuda: str | None, driver: str | None
) -> str | None:
    """Why this pod cannot train on the GPUs spec.gpusPerWorker asked for (None when it can): no CUDA
    device visible to torch, or fewer than the pod's processes. Running on without them would train on
    the CPU, slowly and out of memory, each process with a copy of the whole model."""
    if requested <= 0 or devices >= processes:
        return None
    seen = f"sees {devices} CUDA device{'s' if devices != 1 else ''}" if devices else "sees no CUDA device"
    driver_text = f"the NVIDIA driver is {driver}" if driver else "no NVIDIA driver is readable (/proc/driver/nvidia)"
    if torch_cuda is None:
        fix = (
            f"torch {torch.__version__} is a CPU-only build, {driver_text}: use the trainer image built with CUDA "
            "torch (trainer/Dockerfile's torch build argument)"
        )
    else:
        fix = (
            f"torch {torch.__version__} is built for CUDA {torch_cuda}, {driver_text}: CUDA {torch_cuda} needs a "
            "driver at least as new (580+ for CUDA 13, 525+ for CUDA 12); use a node with such a driver (and the "
            "NVIDIA container runtime, spec.template.runtimeClassName where it is not the default) or an image "
            "built for the driver's CUDA"
        )
    return (
        f"spec.gpusPerWorker is {requested} but this worker {seen} for its {processes} process"
        f"{'es' if processes != 1 else ''}: {fix}; or set gpusPerWorker: 0 to train on CPU"
    )


def nvidia_driver_version(path: str = "/proc/driver/nvidia/version") -> str | None:
    """The loaded NVIDIA kernel module's version (what nvidia-smi calls the driver version), if readable."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    for word in text.split():
        if word.count(".") >= 1 and word.replace(".", "").isdigit():
            return word
    return None


def check_gpus(env: LaunchEnv, environ: Mapping[str, str] = os.environ) -> None:
    """Raise ConfigError (exit 2) when the GPUs this worker asked for are not there."""
    requested = _env_int(environ, GPUS_PER_WORKER_ENV, 0)
    processes = env.local_world_size if env.worker_process else env.nproc_per_node
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    message = missing_gpus_message(requested, processes, devices, torch.version.cuda, nvidia_driver_version())
    if message is not None:
        raise ConfigError(message)


def nccl_environ(environ: Mapping[str, str], run_dir: str | None) -> dict[str, str]:
    """The NCCL settings to add before the process group starts (what the env sets already wins): errors
    end the job instead of hanging it, a hung collective leaves the flight recorder's trace of every rank's
    last collectives in the run folder, and NCCL says what went wrong."""
    wanted = {
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",  # a failed or timed-out collective aborts the process
        "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",  # the flight recorder: the last 2000 collectives
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "NCCL_DEBUG": "WARN",
    }
    if run_dir is not None:
        # torch appends the rank to this prefix: <run dir>/nccl-flight-recorder/rank-<N>
        wanted["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] = str(Path(run_dir) / FLIGHT_RECORDER_DIR / "rank-")
    return {name: value for name, value in wanted.items() if name not in environ}


FLIGHT_RECORDER_DIR = "nccl-flight-recorder"


# --- one process per GPU in a pod --------------------------------------------------------------------


def worker_environ(environ: Mapping[str, str], env: LaunchEnv, local_rank: int, termination_log: str) -> dict[str, str]:
    """The env of local worker `local_rank`: torchrun's variables, as torchrun would set them."""
    child = dict(environ)
    child.update(
        RANK=str(env.node_rank * env.nproc_per_node + local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_WORLD_SIZE=str(env.nproc_per_node),
        GROUP_RANK=str(env.node_rank),
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
        **{TERMINATION_LOG_ENV: termination_log},
        FINETUNE_LOCAL_WORKER="1",
    )
    if env.node_rank == 0:
        # Rank 0 listens in this pod: reach it over loopback rather than through DNS.
        child["MASTER_ADDR"] = "127.0.0.1"
    threads = cpu_threads_per_worker(environ, env.nproc_per_node)
    if threads is not None:
        child["OMP_NUM_THREADS"] = threads
    return child


def cpu_threads_per_worker(environ: Mapping[str, str], nproc: int) -> str | None:
    """OMP_NUM_THREADS for each of a pod's nproc CPU workers: a share of the cores, unless the env sets it."""
    if "OMP_NUM_THREADS" in environ or torch.cuda.is_available():
        return None
    return str(max(1, (os.cpu_count() or 1) // nproc))


def pod_exit_code(codes: Sequence[int], stopping: bool) -> int:
    """One exit code for the pod from its workers': permanent beats stopped beats retryable beats done."""
    done, stopped = ExitCode.DONE, ExitCode.STOPPED
    if all(code == done for code in codes):
        return done
    if ExitCode.PERMANENT in codes:
        return ExitCode.PERMANENT
    if stopping and all(code in (done, stopped) for code in codes):
        return stopped
    failures = [code for code in codes if code not in (done, stopped)]
    return exit_code_of(failures[0] if failures else stopped)


def launch_local_workers(
    config_path: str, env: LaunchEnv, environ: Mapping[str, str] = os.environ
) -> tuple[int, str | None]:
    """Run nproc_per_node workers of this pod to the end; return (exit code, the termination message).

    A worker that fails stops the others (SIGTERM, then SIGKILL after WORKER_STOP_GRACE_S), as torchrun
    does; SIGTERM to this process is forwarded to every worker.
    """
    log.info("starting %d worker processes (node rank %d of %d)", env.nproc_per_node, env.node_rank, env.nnodes)
    with tempfile.TemporaryDirectory(prefix="finetune-workers-") as scratch:
        logs = [str(Path(scratch) / f"termination-{i}.log") for i in range(env.nproc_per_node)]
        command = [sys.executable, "-m", "finetune_trainer", "--config", config_path]
        workers = [
            subprocess.Popen(command, env=worker_environ(environ, env, i, logs[i])) for i in range(env.nproc_per_node)
        ]
        stopping = False

        def forward(signum: int, _frame: Any) -> None:
            nonlocal stopping
            stopping = True
            for worker in workers:
                if worker.poll() is None:
                    worker.send_signal(signum)

        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            codes = _wait_for_workers(workers)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        code = pod_exit_code(codes, stopping)
        finished = (ExitCode.DONE, ExitCode.STOPPED)
        culprit = next((i for i, c in enumerate(codes) if c not in finished), 0)
        message = Path(logs[culprit]).read_text().strip() if Path(logs[culprit]).exists() else None
        if message is None and code not in finished:
            message = f"error (retryable): worker local rank {culprit} exited with code {codes[culprit]}"
        return code, message


def _wait_for_workers(workers: list[subprocess.Popen]) -> list[int]:
    failed_at: float | None = None
    while any(worker.poll() is None for worker in workers):
        codes = [worker.poll() for worker in workers]
        if failed_at is None and any(code not in (None, ExitCode.DONE, ExitCode.STOPPED) for code in codes):
            failed_at = time.monotonic()
            log.warning("a worker failed (exit codes %s): stopping the others", codes)
            for worker in workers:
                if worker.poll() is None:
                    worker.terminate()
        if failed_at is not None and time.monotonic() - failed_at > WORKER_STOP_GRACE_S:
            for worker in workers:
                if worker.poll() is None:
                    worker.kill()
        time.sleep(0.2)
    return [worker.returncode for worker in workers]


# --- rendezvous --------------------------------------------------------------------------------------


def wait_for_master(
    addr: str, port: int, timeout_s: float, log_every_s: float = 10.0, should_stop: Callable[[], bool] | None = None
) -> None:
    """Block until addr resolves and addr:port accepts a connection, or raise RendezvousTimeout.

    On Kubernetes a worker often starts before rank 0's DNS name exists or its port listens; without
    this wait init_process_group fails and the attempt is burnt. should_stop() ends the wait early
    (StoppedWhileWaiting), so a SIGTERM during it exits at once.
    """
    started = time.monotonic()
    last_log = started - log_every_s
    delay = 0.1
    while True:
        if should_stop is not None and should_stop():
            raise StoppedWhileWaiting(f"stopped while waiting for rank 0 at {addr}:{port}")
        try:
            socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            reason = f"{addr} does not resolve yet ({e.strerror})"
        else:
            try:
                with socket.create_connection((addr, port), timeout=2):
                    pass
                waited = time.monotonic() - started
                if waited > 1:
                    log.info("rank 0 at %s:%d is reachable after %.0f s", addr, port, waited)
                return
            except OSError as e:
                reason = f"{addr}:{port} does not accept connections yet ({e.strerror or e})"
        now = time.monotonic()
        if now - started >= timeout_s:
            raise RendezvousTimeout(f"gave up waiting for rank 0 after {timeout_s:.0f} s: {reason}")
        if now - last_log >= log_every_s:
            log.info("waiting for rank 0: %s (%.0f s of %.0f s)", reason, now - started, timeout_s)
            last_log = now
        time.sleep(min(delay, max(0.0, timeout_s - (now - started))))
        delay = min(delay * 2, 2.0)


# --- the process group -------------------------------------------------------------------------------


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    control_group: Any = None  # gloo group for CPU-side bookkeeping collectives

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def seconds_from_env(name: str, default: int, environ: Mapping[str, str] = os.environ) -> float:
    raw = environ.get(name)
    try:
        return float(raw) if raw else float(default)
    except ValueError as e:
        raise ConfigError(f"environment variable {name}={raw!r} is not a number of seconds") from e


def init_distributed(
    env: LaunchEnv, should_stop: Callable[[], bool] | None = None, run_dir: str | None = None
) -> DistContext:
    """Pick the device, wait for rank 0 and join the process group (nccl on CUDA, gloo on CPU).

    run_dir: where NCCL's flight recorder dumps its trace when a collective times out."""
    if torch.cuda.is_available():
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if env.world_size == 1:
        return DistContext(0, 1, 0, device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        nccl = nccl_environ(os.environ, run_dir)
        try:
            Path(nccl.get("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", ".")).parent.mkdir(parents=True, exist_ok=True)
        except OSError:  # a worker without the run folder's volume: torch's default (/tmp) then
            nccl.pop("TORCH_NCCL_DEBUG_INFO_TEMP_FILE")
        os.environ.update(nccl)
    timeout = datetime.timedelta(seconds=seconds_from_env(COLLECTIVE_TIMEOUT_ENV, DEFAULT_COLLECTIVE_TIMEOUT_SECONDS))
    if env.under_torchrun:
        dist.init_process_group(backend, timeout=timeout)
    else:
        rendezvous_timeout = seconds_from_env("FINETUNE_RENDEZVOUS_TIMEOUT", DEFAULT_RENDEZVOUS_TIMEOUT_S)
        if env.rank != 0:
            wait_for_master(env.master_addr, env.master_port, rendezvous_timeout, should_stop=should_stop)
        store = dist.TCPStore(
            # Rank 0 serves the store on every interface and reaches it over loopback, so it needs no DNS.
            host_name="127.0.0.1" if env.rank == 0 else env.master_addr,
            port=env.master_port,
            world_size=env.world_size,
            is_master=env.rank == 0,
            timeout=datetime.timedelta(seconds=rendezvous_timeout),
        )
        gang_store = dist.PrefixStore(os.environ.get(RUN_ID_ENV) or "finetune", store)
        dist.init_process_group(backend, store=gang_store, rank=env.rank, world_size=env.world_size, timeout=timeout)
    control_group = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else dist.group.WORLD
    log.info("joined the process group: rank %d of %d, %s on %s", env.rank, env.world_size, backend, device)
    return DistContext(env.rank, env.world_size, env.local_rank, device, control_group)


def collective_timed_out(error: BaseException) -> bool:
    """A collective gave up waiting for a peer rank: gloo's "Timed out waiting Nms for recv/send", or torch's
    distributed errors naming a timeout (NCCL's watchdog with async error handling set to raise). With
    TORCH_NCCL_ASYNC_ERROR_HANDLING=1 (nccl_environ) the watchdog aborts the process instead: SIGABRT."""
    message = str(error).lower()
    return "timed out waiting" in message or (isinstance(error, dist.DistError) and "timeout" in message)


def all_reduce_sum(values: list[float] | list[int], ctx: DistContext, dtype: torch.dtype = torch.float64) -> list:
    """Sum small lists of numbers over all ranks (on CPU, through the control group)."""
    if not ctx.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=dtype)
    dist.all_reduce(tensor, group=ctx.control_group)
    return tensor.tolist()


def gather_to_main(obj: Any, ctx: DistContext) -> list[Any] | None:
    """Every rank's obj, in rank order, on rank 0 (None elsewhere)."""
    if not ctx.distributed:
        return [obj]
    objects = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(obj, objects, dst=0, group=ctx.control_group)
    return objects


def all_gather(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's obj, in rank order, on every rank."""
    if not ctx.distributed:
        return [obj]
    objects = [None] * ctx.world_size
    dist.all_gather_object(objects, obj, group=ctx.control_group)
    return objects


def raise_on_every_rank(errors: list[str | None], prefix: str = "") -> None:
    """Raise ConfigError on this rank if any rank reported an error (from all_gather): a permanent error
    that some ranks see ends every rank with exit 2, and none is left waiting in the next collective."""
    failed = [rank for rank, error in enumerate(errors) if error is not None]
    if failed:
        ranks = f" (rank {', '.join(map(str, failed))} of {len(errors)})" if len(errors) > 1 else ""
        raise ConfigError(f"{prefix}{errors[failed[0]]}{ranks}")


def broadcast_from_main(obj: Any, ctx: DistContext) -> Any:
    if not ctx.distributed:
        return obj
    holder = [obj if ctx.is_main else None]
    dist.broadcast_object_list(holder, src=0, group=ctx.control_group)
    return holder[0]


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier(group=ctx.control_group)


def shutdown(ctx: DistContext | None) -> None:
    if ctx is not None and ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
        # A group object still referenced is freed only as the interpreter ends, where tearing down its gloo
        # threads can abort the process (SIGABRT, "terminate called without an active exception"): a rank
        # that trained to the end would exit 134. Seen in about 1 of 16 two-rank runs on a loaded machine.
        ctx.control_group = None
