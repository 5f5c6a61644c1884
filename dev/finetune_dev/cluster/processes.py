"""Background processes that another process can find and stop again (`finetune cluster down`).

Each process leads its own process group and has a pid file holding its pid and its start time, so
a pid the kernel has since reused for something else is never signalled.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

PR_SET_PDEATHSIG = 1
# Processes meant to outlive the caller (die_with_parent=False): held so that Python does not warn
# about dropping a Popen whose process still runs.
_outliving: list[subprocess.Popen] = []


def start(
    argv: Sequence[str | os.PathLike],
    *,
    log_path: Path,
    pid_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    die_with_parent: bool = False,
) -> subprocess.Popen:
    """Start argv in a new session, output appended to log_path, and record it in pid_path.

    die_with_parent: have the kernel kill it when the calling thread dies (test clusters must not
    outlive a killed pytest; `cluster up` clusters must outlive the CLI).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    pid_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [os.fspath(arg) for arg in argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_kill_me_with_parent if die_with_parent else None,
        )
    write_pid_file(pid_path, process.pid)
    if not die_with_parent:
        _outliving.append(process)
    return process


def write_pid_file(pid_path: Path, pid: int) -> None:
    partial = pid_path.with_name(pid_path.name + ".partial")
    partial.write_text(f"{pid} {start_time(pid)}\n")
    partial.replace(pid_path)


def running_pid(pid_path: Path) -> int | None:
    """The pid recorded in pid_path if that very process still runs, else None."""
    try:
        pid_text, started = pid_path.read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        return None
    return pid if start_time(pid) == started else None


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot, or None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name in parentheses may hold spaces
    state, started = fields[0], fields[19]
    return None if state in ("Z", "X") else started


def wait_for_exit(pid: int, timeout: float) -> bool:
    """Wait up to timeout seconds for pid (not necessarily our child) to exit; True if it did."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except OSError:  # kernels before 5.3 have no pidfd: poll instead
        return _poll_for_exit(pid, timeout)
    try:
        deadline = time.monotonic() + timeout
        while start_time(pid) is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            select.select([pidfd], [], [], remaining)
        return True
    finally:
        os.close(pidfd)


def stop(pid_path: Path, grace_seconds: float = 10.0) -> None:
    """SIGTERM the process group recorded in pid_path, SIGKILL it after the grace period, remove the file."""
    pid = running_pid(pid_path)
    if pid is not None:
        terminate_group(pid, grace_seconds)
        _reap(pid)
    pid_path.unlink(missing_ok=True)


def terminate_group(pid: int, grace_seconds: float) -> None:
    signal_group(pid, signal.SIGTERM)
    if not wait_for_exit(pid, grace_seconds):
        signal_group(pid, signal.SIGKILL)
        wait_for_exit(pid, 5.0)


def signal_group(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signum)


def _reap(pid: int) -> None:
    """Collect the exit status of an outliving child that this very process has stopped after all."""
    for process in [process for process in _outliving if process.pid == pid]:
        process.wait()
        _outliving.remove(process)


def _poll_for_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while start_time(pid) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _kill_me_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
