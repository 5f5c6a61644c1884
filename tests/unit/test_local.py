"""`finetune local`: each worker gets its own GPUs, and no worker process outlives a stopped run (SIGTERM,
SIGHUP, a second Ctrl-C), checked with the pids the run records in local-workers.json."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune_dev.harness import REPO, wait_for
from finetune_operator.api import FineTuneJob
from finetune_operator.config import OperatorSettings
from finetune_operator.local import LocalRun, LocalSpecError, assign_gpus, visible_gpus

from .conftest import job_body


def job(**spec) -> FineTuneJob:
    return FineTuneJob.model_validate(job_body(**spec))


@pytest.mark.parametrize(
    ("workers", "gpus", "visible", "expected"),
    [
        (2, 4, None, {0: "0,1,2,3", 1: "4,5,6,7"}),
        (2, 2, ["3", "5", "6", "7", "1"], {0: "3,5", 1: "6,7"}),
        (3, 0, ["0", "1"], {0: "", 1: "", 2: ""}),  # a CPU pod has no GPU, nor has its stand-in
    ],
)
def test_each_worker_gets_its_own_gpus(workers, gpus, visible, expected):
    assert assign_gpus(job(workers=workers, gpusPerWorker=gpus).spec, visible) == expected


def test_too_few_gpus_is_refused_naming_the_fields():
    with pytest.raises(LocalSpecError, match=r"spec.workers=2 x spec.gpusPerWorker=4 needs 8 GPUs.*offers 4"):
        assign_gpus(job(workers=2, gpusPerWorker=4).spec, ["0", "1", "2", "3"])


def test_visible_devices_come_from_the_environment():
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2, 3,"}) == ["2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []


def test_worker_env_carries_the_split(tmp_path):
    run = LocalRun(job(workers=2, gpusPerWorker=2), tmp_path, OperatorSettings(), ["0", "1", "2", "3"])
    assert [run.worker_env(rank, 0)[1]["CUDA_VISIBLE_DEVICES"] for rank in (0, 1)] == ["0,1", "2,3"]


# --- stopping a run leaves no process behind ---------------------------------------------------------------

WORKER = """
import os, signal, subprocess, sys, time
from pathlib import Path
if os.environ.get("IGNORE_TERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a trainer stuck past its grace period
stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
child = subprocess.Popen([sys.executable, "-c", stubborn])
Path(sys.argv[1], f"child-{os.environ['NODE_RANK']}").write_text(str(child.pid))
time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie has ended; only its parent's wait is missing


class LocalRunProcess:
    """`finetune local` on a job of 2 workers that sleep (each with a child of its own)."""

    def __init__(self, tmp_path: Path, ignore_term: bool, grace: int) -> None:
        self.output = tmp_path / "out"
        script = tmp_path / "worker.py"
        script.write_text(WORKER)
        env_vars = [{"name": "IGNORE_TERM", "value": "1"}] if ignore_term else []
        spec = {
            **job_body(workers=2, gpusPerWorker=0)["spec"],
            "command": [sys.executable, str(script), str(self.output)],
            "restartPolicy": {"maxRestarts": 0},
            "template": {"env": env_vars},
        }
        job_file = tmp_path / "job.yaml"
        job_file.write_text(yaml.safe_dump({"metadata": {"name": "sleepers"}, "spec": spec}))
        env = {
            **os.environ,
            "FINETUNE_OPERATOR_TERMINATION_GRACE_PERIOD_SECONDS": str(grace),
            "PYTHONPATH": os.pathsep.join(str(REPO / part) for part in ("operator", "trainer")),
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "finetune_operator", "local", str(job_file), "--output-dir", str(self.output)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # signals reach only the supervisor, as a terminal's would
        )

    def pids(self) -> list[int]:
        """Each worker's pid (from local-workers.json) and its child's, once all are running."""
        try:
            workers = json.loads((self.output / "local-workers.json").read_text())
            children = [int((self.output / f"child-{rank}").read_text()) for rank in ("0", "1")]
        except (OSError, ValueError):
            return []
        return [entry["pid"] for entry in workers.values()] + children if len(workers) == 2 else []

    def wait_for_line(self, text: str) -> None:
        for line in self.process.stdout:
            if text in line:
                return
        raise AssertionError(f"finetune local ended without printing {text!r}")

    def finish(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        finally:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)


@pytest.mark.parametrize(
    ("signals", "ignore_term", "grace", "code"),
    [
        ([signal.SIGTERM], False, 30, 143),
        ([signal.SIGHUP], False, 30, 129),
        ([signal.SIGTERM], True, 1, 143),  # workers ignoring SIGTERM are killed after the grace period
        ([signal.SIGINT, signal.SIGINT], True, 600, 130),  # the second Ctrl-C does not wait out the grace
    ],
    ids=["sigterm", "sighup", "sigterm-past-grace", "second-ctrl-c"],
)
def test_stopping_leaves_no_process_behind(tmp_path, signals, ignore_term, grace, code):
    run = LocalRunProcess(tmp_path, ignore_term, grace)
    pids = wait_for(run.pids, timeout=60, what="both workers and their children to start")
    assert all(map(alive, pids))
    first, *more = signals
    run.process.send_signal(first)
    run.wait_for_line("stopping the workers")
    for sig in more:
        run.process.send_signal(sig)
    assert run.finish(timeout=30) == code
    wait_for(lambda: not any(map(alive, pids)), timeout=10, what=f"pids {pids} to be gone")


def test_a_local_worker_is_owned_by_its_job_as_a_pod_is(tmp_path):
    """reconcile() sees only pods whose controller is the job: the local stand-ins must say so too."""
    from datetime import datetime, timezone

    from finetune_operator.builders import LABEL_ATTEMPT, LABEL_JOB, LABEL_RANK, owner_reference
    from finetune_operator.local import LocalWorker
    from finetune_operator.status import reconcile

    local_job = job(workers=1)
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    worker = LocalWorker(
        0,
        0,
        process,
        tmp_path / "termination-log",
        labels={LABEL_JOB: local_job.name, LABEL_RANK: "0", LABEL_ATTEMPT: "0"},
        owner=owner_reference(local_job),
    )
    local_job.status.phase = "Running"  # type: ignore[assignment]
    decision = reconcile(local_job, [worker.as_pod()], datetime.now(timezone.utc))
    assert decision.status.phase == "Succeeded", decision.status.reason


def test_a_stopping_worker_reads_as_a_terminating_pod_with_its_deadline(tmp_path):
    """A gang restart sees the old workers as pods being deleted: their deletionTimestamp must parse (a
    worker that outlived its SIGTERM once crashed `finetune local` here)."""
    from datetime import datetime, timedelta, timezone

    from finetune_operator.builders import LABEL_ATTEMPT, LABEL_JOB, LABEL_RANK, owner_reference
    from finetune_operator.local import LocalWorker
    from finetune_operator.status import parse_time, reconcile

    local_job = job(workers=1)
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    worker = LocalWorker(
        0,
        0,
        process,
        tmp_path / "termination-log",
        labels={LABEL_JOB: local_job.name, LABEL_RANK: "0", LABEL_ATTEMPT: "0"},
        owner=owner_reference(local_job),
    )
    try:
        before = datetime.now(timezone.utc).replace(microsecond=0)
        worker.stop(grace_seconds=30)
        pod = worker.as_pod()
        deadline = parse_time(pod["metadata"]["deletionTimestamp"])
        assert before + timedelta(seconds=30) <= deadline <= datetime.now(timezone.utc) + timedelta(seconds=31)
        local_job.status.phase = "Running"  # type: ignore[assignment]
        local_job.status.attempt = 1
        reconcile(local_job, [pod], datetime.now(timezone.utc))  # the old attempt's pod, still terminating
    finally:
        process.kill()
        process.wait()
