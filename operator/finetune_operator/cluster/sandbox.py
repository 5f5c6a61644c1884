"""Runs one container of a local-node pod: the node agent starts `python -m finetune_operator.cluster.sandbox
SPEC.json`, which enters a private mount and UTS namespace, bind-mounts the pod's volumes, hosts file and
termination-message file at the paths the pod asks for, sets the pod's hostname, runs the command, and
records its exit in the spec's exit file, so that a restarted agent still learns how the container ended.

As root the namespaces are plain ones. Otherwise an unprivileged user namespace (the process is root
inside it, its own user outside) makes the bind mounts possible where the kernel allows those.
Mount points that do not exist yet are created on the host, as empty folders or files.

The spec (written by podworker.py):
    {"argv": [...], "env": {...}, "workingDir": "/", "hostname": "...",
     "mounts": [{"source": "...", "target": "...", "readOnly": false}], "exitFile": "..."}
"""

from __future__ import annotations

import ctypes
import datetime
import json
import os
import shutil
import signal
import sys
from pathlib import Path

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWUSER = 0x10000000
MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
# statvfs flags a read-only remount must keep: in a user namespace the kernel refuses to drop them.
KEPT_MOUNT_FLAGS = {
    os.ST_NOSUID: 2,  # MS_NOSUID
    os.ST_NODEV: 4,  # MS_NODEV
    os.ST_NOEXEC: 8,  # MS_NOEXEC
    os.ST_NOATIME: 1024,  # MS_NOATIME
    os.ST_NODIRATIME: 2048,  # MS_NODIRATIME
    os.ST_RELATIME: 1 << 21,  # MS_RELATIME
}
START_ERROR_EXIT_CODE = 128  # what container runtimes report when the command cannot be started

_libc = ctypes.CDLL(None, use_errno=True)


class StartError(Exception):
    """The container's command could not be started; the message goes into its terminated state."""


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    exit_file = Path(spec["exitFile"])
    try:
        _enter_namespaces()
        _set_hostname(spec["hostname"])
        for mount in spec["mounts"]:
            _bind_mount(mount["source"], mount["target"], mount.get("readOnly", False))
        working_dir = spec.get("workingDir") or "/"
        os.makedirs(working_dir, exist_ok=True)
        os.chdir(working_dir)
        executable = _resolve(spec["argv"], spec["env"])
    except (OSError, StartError) as error:
        print(f"local node: cannot start container: {error}", file=sys.stderr, flush=True)
        _record_exit(exit_file, START_ERROR_EXIT_CODE, "StartError", str(error))
        return START_ERROR_EXIT_CODE
    exit_code = _run(executable, spec["argv"], spec["env"])
    _record_exit(exit_file, exit_code, "Completed" if exit_code == 0 else "Error", None)
    # A container's end is the end of all its processes: leftovers (say, DDP workers of a crashed
    # launcher) would otherwise keep ports and GPUs. They share our process group.
    os.killpg(os.getpgid(0), signal.SIGKILL)
    return exit_code


def _enter_namespaces() -> None:
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNS | CLONE_NEWUTS
    if os.geteuid() != 0:
        flags |= CLONE_NEWUSER
    if _libc.unshare(flags) != 0:
        raise StartError(
            f"unshare: {os.strerror(ctypes.get_errno())}: the local node runs pods in their own mount "
            "namespace; run it as root, or enable unprivileged user namespaces "
            "(sysctl kernel.unprivileged_userns_clone=1)"
        )
    if flags & CLONE_NEWUSER:
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
        Path("/proc/self/gid_map").write_text(f"0 {gid} 1")
    # Our mounts must not propagate back to the host's mount namespace.
    _mount(None, "/", MS_REC | MS_PRIVATE)


def _set_hostname(hostname: str) -> None:
    name = hostname.encode()
    if _libc.sethostname(name, len(name)) != 0:
        raise OSError(ctypes.get_errno(), f"sethostname {hostname}")


def _bind_mount(source: str, target: str, read_only: bool) -> None:
    if not os.path.lexists(target):
        if os.path.isdir(source):
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            Path(target).touch()
    _mount(source, target, MS_BIND | MS_REC)
    if read_only:
        kept = os.statvfs(target).f_flag
        flags = MS_BIND | MS_REMOUNT | MS_RDONLY
        flags |= sum(ms_flag for st_flag, ms_flag in KEPT_MOUNT_FLAGS.items() if kept & st_flag)
        _mount(None, target, flags)


def _mount(source: str | None, target: str, flags: int) -> None:
    encoded_source = source.encode() if source is not None else None
    if _libc.mount(encoded_source, target.encode(), None, flags, None) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {source or ''} on {target}: {os.strerror(errno)}")


def _resolve(argv: list[str], env: dict[str, str]) -> str:
    if not argv:
        raise StartError("the container has no command (the local node has no image to take one from)")
    if "/" in argv[0]:
        return argv[0]
    found = shutil.which(argv[0], path=env.get("PATH", os.defpath))
    if found is None:
        raise StartError(f'exec: "{argv[0]}": executable file not found in $PATH')
    return found


def _run(executable: str, argv: list[str], env: dict[str, str]) -> int:
    """Run the command as our child and return its exit code (128 + signal if a signal ended it).

    We stay its parent to learn the exit code; SIGTERM and SIGINT sent to the pod's process group are
    for the command, so we ignore them ourselves.
    """
    forwarded = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    for signum in forwarded:
        signal.signal(signum, signal.SIG_IGN)
    child = os.fork()
    if child == 0:
        # Python ignores SIGPIPE and SIGXFSZ; ignored signals stay ignored across exec.
        for signum in (*forwarded, signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(signum, signal.SIG_DFL)
        try:
            os.execve(executable, argv, env)
        except OSError as error:
            print(f"local node: exec {executable}: {error}", file=sys.stderr, flush=True)
        os._exit(START_ERROR_EXIT_CODE)
    _, status = os.waitpid(child, 0)
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def _record_exit(exit_file: Path, exit_code: int, reason: str, message: str | None) -> None:
    record = {
        "exitCode": exit_code,
        "reason": reason,
        "message": message,
        "finishedAt": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    partial = exit_file.with_name(exit_file.name + ".partial")
    partial.write_text(json.dumps(record))
    partial.replace(exit_file)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
