"""`finetune local`: run a FineTuneJob as local processes with the operator's own wiring and restart logic.

Each worker process stands in for a pod: it gets the env build_worker_pod gives that pod, and the
supervisor feeds the processes' states to the operator's reconcile() as pod objects, so restarts,
backoff, maxRestarts and permanent errors behave exactly as on Kubernetes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from finetune_operator.api import FINISHED_PHASES, FineTuneJob, FineTuneJobSpec, FineTuneJobStatus, Phase
from finetune_operator.builders import (
    CONFIG_FILE,
    DEFAULT_COMMAND,
    LABEL_ATTEMPT,
    LABEL_JOB,
    LABEL_RANK,
    TRAINER_CONTAINER,
    WORKER_NAME,
    build_worker_pod,
    owner_reference,
    trainer_config_yaml,
)
from finetune_operator.config import OperatorSettings
from finetune_operator.status import reconcile, rfc3339
from finetune_trainer.config import format_validation_error
from finetune_trainer.contract import (
    ADAPTER_DIR,
    CONFIG_ENV,
    METRICS_FILE,
    PROGRESS_FILE,
    TERMINATION_LOG_ENV,
    ExitCode,
    ProgressReport,
    exit_code_of,
)

# `finetune local` exits as its trainers would: 0 done, 2 bad spec or data, 1 failed; 128 + N on signal N.
EXIT_FAILED, EXIT_BAD_SPEC = ExitCode.RETRYABLE, ExitCode.PERMANENT
TICK_SECONDS = 0.5


class LocalSpecError(Exception):
    """The job file cannot be run; the message names the file and field."""


def load_job(path: Path) -> FineTuneJob:
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as e:
        raise LocalSpecError(f"cannot read {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise LocalSpecError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(document, dict) or not isinstance(document.get("spec"), dict):
        raise LocalSpecError(f"{path}: expected a FineTuneJob with a spec mapping")
    metadata = document.get("metadata") or {}
    try:
        spec = FineTuneJobSpec.model_validate(document["spec"])
    except ValidationError as e:
        raise LocalSpecError(f"{path}: {format_validation_error(e, prefix='spec.')}") from e
    return FineTuneJob(
        metadata={
            "name": metadata.get("name", path.stem),
            "namespace": metadata.get("namespace", "default"),
            "uid": "local",
            "generation": 1,
        },
        spec=spec,
        status=FineTuneJobStatus(),
    )


def visible_gpus(environ: dict[str, str]) -> list[str] | None:
    """The GPUs this machine lets us use: CUDA_VISIBLE_DEVICES if set, else what nvidia-smi lists; None when
    neither says (no driver: the workers will find no GPU and say so)."""
    if "CUDA_VISIBLE_DEVICES" in environ:
        return [d.strip() for d in environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    try:
        listed = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return [line.strip() for line in listed.stdout.splitlines() if line.strip()]


def assign_gpus(spec: FineTuneJobSpec, gpus: list[str] | None) -> dict[int, str]:
    """CUDA_VISIBLE_DEVICES per worker: each its own gpusPerWorker devices, as each pod gets its own GPUs."""
    per_worker = spec.gpus_per_worker
    if per_worker == 0:
        return {rank: "" for rank in range(spec.workers)}  # a CPU pod has no GPU; nor has its stand-in
    needed = spec.workers * per_worker
    if gpus is None:
        gpus = [str(index) for index in range(needed)]
    if len(gpus) < needed:
        raise LocalSpecError(
            f"spec.workers={spec.workers} x spec.gpusPerWorker={per_worker} needs {needed} GPUs; this machine "
            f"offers {len(gpus)} ({','.join(gpus) or 'none'}); lower them or run on the cluster"
        )
    return {rank: ",".join(gpus[rank * per_worker : (rank + 1) * per_worker]) for rank in range(spec.workers)}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class LocalWorker:
    """A worker process and what a pod would report about it."""

    rank: int
    attempt: int
    process: subprocess.Popen
    termination_log: Path
    stop_requested_at: float | None = None
    deletion_timestamp: str | None = None  # as the API server sets it: when the stop was asked plus the grace
    labels: dict[str, str] = field(default_factory=dict)
    owner: dict[str, Any] = field(default_factory=dict)  # the job's ownerReference, as on its pods

    @property
    def name(self) -> str:
        return WORKER_NAME.format(job=self.labels[LABEL_JOB], rank=self.rank)

    def as_pod(self) -> dict[str, Any]:
        code = self.process.poll()
        metadata: dict[str, Any] = {"name": self.name, "labels": self.labels, "ownerReferences": [self.owner]}
        if self.stop_requested_at is not None:
            metadata["deletionTimestamp"] = self.deletion_timestamp
        state: dict[str, Any]
        if code is None:
            state, phase, ready = {"running": {}}, "Running", "True"
        else:
            message = self.termination_log.read_text().strip() if self.termination_log.exists() else ""
            reason = "Completed" if code == 0 else _signal_reason(code)
            state = {"terminated": {"exitCode": _exit_code(code), "reason": reason, "message": message}}
            phase, ready = ("Succeeded" if code == 0 else "Failed"), "False"
        return {
            "metadata": metadata,
            "spec": {"nodeName": socket.gethostname()},
            "status": {
                "phase": phase,
                "conditions": [{"type": "Ready", "status": ready}],
                "containerStatuses": [{"name": TRAINER_CONTAINER, "state": state}],
            },
        }

    def stop(self, grace_seconds: float) -> None:
        """SIGTERM the worker's process group (the trainer checkpoints), SIGKILL after the grace period."""
        now = time.monotonic()
        if self.stop_requested_at is None:
            self.stop_requested_at = now  # also when it has exited: a deleted pod, gone once it has
            self.deletion_timestamp = rfc3339(datetime.now(timezone.utc) + timedelta(seconds=grace_seconds))
            if self.process.poll() is None:
                _signal_group(self.process, signal.SIGTERM)
        elif self.process.poll() is None and now - self.stop_requested_at > grace_seconds:
            _signal_group(self.process, signal.SIGKILL)


def _exit_code(code: int) -> int:
    return exit_code_of(code)


def _signal_reason(code: int) -> str:
    return "Killed" if code == -signal.SIGKILL else "Error"


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)


class LocalRun:
    """Supervises the gang of local worker processes for one job."""

    def __init__(
        self, job: FineTuneJob, output_dir: Path, settings: OperatorSettings, gpus: list[str] | None = None
    ) -> None:
        self.job = job
        self.gpus = assign_gpus(job.spec, gpus)
        self.output_dir = output_dir
        self.settings = settings
        self.logs = output_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.config_path = output_dir / CONFIG_FILE
        self.config_path.write_text(trainer_config_yaml(job.spec, output_dir=str(output_dir)))
        self.workers: dict[int, LocalWorker] = {}
        self.master_ports: dict[int, int] = {}  # a fresh port per attempt: the last one may linger
        self.last_step: int | None = None

    def worker_env(self, rank: int, attempt: int) -> tuple[list[str], dict[str, str]]:
        """The command and env of the pod build_worker_pod makes for this rank, pointed at local paths."""
        pod = build_worker_pod(self.job, rank, attempt, self.settings)
        container = pod["spec"]["containers"][0]
        env = dict(os.environ)
        for var in container["env"]:
            if "value" in var:
                env[var["name"]] = var["value"]
            else:
                print(f"warning: env {var['name']} comes from the cluster (valueFrom) and is not set locally")
        for path_var in ("HOME", "HF_HOME", "TRITON_CACHE_DIR"):
            if path_var in os.environ:  # the pod's volumes are pod-isms: here the user's own folders
                env[path_var] = os.environ[path_var]
            else:
                env.pop(path_var, None)
        port = self.master_ports.setdefault(attempt, free_port())
        local = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        env |= local | {f"PET_{key}": value for key, value in local.items()}
        env["CUDA_VISIBLE_DEVICES"] = self.gpus[rank]
        env[CONFIG_ENV] = str(self.config_path)
        env[TERMINATION_LOG_ENV] = str(self.logs / f"worker-{rank}.termination-log")
        command = container["command"]
        if command == DEFAULT_COMMAND:
            command = [sys.executable, "-m", "finetune_trainer", "--config", str(self.config_path)]
        return command, env

    def start_worker(self, rank: int, attempt: int) -> None:
        command, env = self.worker_env(rank, attempt)
        termination_log = Path(env[TERMINATION_LOG_ENV])
        termination_log.unlink(missing_ok=True)
        log = (self.logs / f"worker-{rank}.log").open("a")
        log.write(f"--- attempt {attempt} ---\n")
        log.flush()
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        labels = {LABEL_JOB: self.job.name, LABEL_RANK: str(rank), LABEL_ATTEMPT: str(attempt)}
        self.workers[rank] = LocalWorker(
            rank, attempt, process, termination_log, labels=labels, owner=owner_reference(self.job)
        )
        self._write_pids()

    def _write_pids(self) -> None:
        pids = {str(w.rank): {"pid": w.process.pid, "attempt": w.attempt} for w in self.workers.values()}
        (self.output_dir / "local-workers.json").write_text(json.dumps(pids))

    def pods(self) -> list[dict[str, Any]]:
        gone = [key for key, w in self.workers.items() if w.stop_requested_at and w.process.poll() is not None]
        for key in gone:
            del self.workers[key]  # a deleted pod that has exited disappears
        return [worker.as_pod() for worker in self.workers.values()]

    def progress(self) -> ProgressReport | None:
        try:
            return ProgressReport.from_json((self.output_dir / PROGRESS_FILE).read_bytes())
        except OSError:
            return None

    def step(self) -> float | None:
        """One reconcile pass over the processes; returns how long to wait before the next."""
        decision = reconcile(self.job, self.pods(), datetime.now(timezone.utc), self.progress())
        self.job.status = decision.status
        for event in decision.events:
            print(f"[{event.type}] {event.reason}: {event.message}", flush=True)
        names = set(decision.delete_workers)
        for worker in self.workers.values():
            if worker.name in names or worker.stop_requested_at is not None:
                worker.stop(self.settings.termination_grace_period_seconds)
        for rank in decision.create_missing_workers:
            if rank not in self.workers:
                self.start_worker(rank, decision.status.attempt)
        self._print_progress()
        return decision.requeue_after

    def _print_progress(self) -> None:
        progress = self.job.status.progress
        if progress is None or progress.step == self.last_step:
            return
        self.last_step = progress.step
        total = f"/{progress.total_steps}" if progress.total_steps else ""
        loss = f" loss {progress.loss:.4f}" if progress.loss is not None else ""
        speed = f" {progress.tokens_per_second:.0f} tokens/s" if progress.tokens_per_second else ""
        print(f"step {progress.step}{total}{loss}{speed} (restarts {self.job.status.restarts})", flush=True)

    def stop_all(self) -> None:
        """SIGTERM every worker (they checkpoint), SIGKILL what is left after the grace period."""
        deadline = time.monotonic() + self.settings.termination_grace_period_seconds
        for worker in self.workers.values():
            worker.stop(self.settings.termination_grace_period_seconds)
        for worker in self.workers.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        self.kill_all()

    def signal_all(self, sig: int) -> None:
        """Signal every worker's process group; safe in a signal handler (no waiting)."""
        for worker in list(self.workers.values()):
            _signal_group(worker.process, sig)  # also when the leader exited: its children may not have

    def kill_all(self) -> None:
        """SIGKILL every worker's process group, the processes it started included, and reap them."""
        self.signal_all(signal.SIGKILL)
        for worker in self.workers.values():
            worker.process.wait()

    def run(self) -> int:
        while self.job.status.phase not in FINISHED_PHASES:
            requeue = self.step()
            wait = TICK_SECONDS if requeue is None else min(max(requeue, 0.05), TICK_SECONDS)
            time.sleep(wait)  # supervision tick: processes have no watch API to wait on
        self.stop_all()
        return self.summary()

    def summary(self) -> int:
        status = self.job.status
        failed = [c for c in status.conditions if c.type == Phase.failed.value and c.status == "True"]
        print(f"\n{self.job.name}: {status.phase} after {status.restarts} restart(s)")
        metrics_file = self.output_dir / METRICS_FILE
        if status.phase == Phase.succeeded.value:
            if (self.output_dir / ADAPTER_DIR).is_dir():  # a `command:` job may write none
                print(f"  adapter:  {self.output_dir / ADAPTER_DIR}")
            if metrics_file.exists():
                metrics = json.loads(metrics_file.read_text())
                for key in ("train_loss", "train_samples_per_second", "train_tokens_per_second", "global_step"):
                    if key in metrics:
                        print(f"  {key}: {metrics[key]}")
            return 0
        message = failed[0].message if failed else "unknown"
        print(f"  reason:   {failed[0].reason if failed else 'Unknown'}: {message}")
        print(f"  logs:     {self.logs}")
        return EXIT_BAD_SPEC if failed and failed[0].reason == "PermanentError" else EXIT_FAILED


class Stopped(Exception):
    """Ctrl-C, SIGTERM or SIGHUP reached `finetune local`: stop the workers after a checkpoint."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """The first stop signal ends the supervision loop (raised as Stopped); any later one SIGKILLs the
    workers there and then, without raising, so no half-done cleanup is cut short."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self, run: LocalRun) -> None:
        self.run = run
        self.first: int | None = None

    def __call__(self, signum: int, _frame: Any) -> None:
        if self.first is None:
            self.first = signum
            raise Stopped(signum)
        self.run.signal_all(signal.SIGKILL)

    def __enter__(self) -> StopSignals:
        self.previous = {signum: signal.signal(signum, self) for signum in self.SIGNALS}
        return self

    def __exit__(self, *_: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def run_local(job_path: Path, output_dir: Path, max_restarts: int | None = None) -> int:
    try:
        job = load_job(job_path)
        if max_restarts is not None:
            job.spec.restart_policy.max_restarts = max_restarts
        output_dir = output_dir.resolve()
        output_dir.mkdir(parents=True, exist_ok=True)
        gpus = visible_gpus(dict(os.environ)) if job.spec.gpus_per_worker else None
        run = LocalRun(job, output_dir, OperatorSettings(), gpus)
    except LocalSpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_SPEC
    print(
        f"{job.name}: {job.spec.workers} worker(s) x {job.spec.processes_per_worker} process(es), "
        f"output in {output_dir}",
        flush=True,
    )
    with StopSignals(run):
        try:
            return run.run()
        except Stopped as stop:
            print(f"\n{stop}: stopping the workers after a checkpoint (again to kill them now)", flush=True)
            run.stop_all()
            return exit_code_of(-stop.signum)  # 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP
        finally:
            run.kill_all()  # whatever ended the run, no worker outlives it
