"""Runs one container of a local-node pod. The node agent starts `python -m
finetune_dev.cluster.sandbox SPEC.json`, which

1. enters a private mount and UTS namespace (as root; otherwise an unprivileged user namespace too,
   where the kernel allows those: the process is root inside it, its own user outside);
2. changes root to a root of its own: a tmpfs holding bind mounts of the host's top-level entries, so
   the pod sees the host's files, but a mount point the host lacks (/etc/finetune, /output,
   /dev/termination-log) is created only inside the pod: in the root tmpfs, in a volume, or in a
   private copy of its host folder (a tmpfs holding bind mounts of that folder's entries);
3. bind-mounts the pod's volumes, hosts file and termination-message file at the paths the pod asks
   for, sets the pod's hostname, runs the command, and records its exit in the spec's exit file, so
   that a restarted agent still learns how the container ended.

Files the pod writes through the bind mounts land on the host; files it creates directly in a new or
private folder live in memory and go with the container, as a container's writable layer would.

The spec (written by podworker.py):
    {"argv": [...], "env": {...}, "workingDir": "/", "hostname": "...", "root": "<empty folder>",
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
MNT_DETACH = 2
# statvfs flags a read-only remount must keep: in a user namespace the kernel refuses to drop them.
KEPT_MOUNT_FLAGS = {
    os.ST_NOSUID: 2,  # MS_NOSUID
    os.ST_NODEV: 4,  # MS_NODEV
    os.ST_NOEXEC: 8,  # MS_NOEXEC
    os.ST_NOATIME: 1024,  # MS_NOATIME
    os.ST_NODIRATIME: 2048,  # MS_NODIRATIME
    os.ST_RELATIME: 1 << 21,  # MS_RELATIME
}
STAGING = "/.sandbox-staging"  # in the pod's own root tmpfs
START_ERROR_EXIT_CODE = 128  # what container runtimes report when the command cannot be started

_libc = ctypes.CDLL(None, use_errno=True)


class StartError(Exception):
    """The container's command could not be started; the message goes into its terminated state."""


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    # Opened first: the pod's mounts may cover the folder (a volume at /tmp, say).
    exit_dir = os.open(os.path.dirname(spec["exitFile"]), os.O_RDONLY | os.O_DIRECTORY)
    exit_name = os.path.basename(spec["exitFile"])
    try:
        executable = _prepare(spec)
    except (OSError, StartError) as error:
        print(f"local node: cannot start container: {error}", file=sys.stderr, flush=True)
        _record_exit(exit_dir, exit_name, START_ERROR_EXIT_CODE, "StartError", str(error))
        return START_ERROR_EXIT_CODE
    exit_code = _run(executable, spec["argv"], spec["env"])
    _record_exit(exit_dir, exit_name, exit_code, "Completed" if exit_code == 0 else "Error", None)
    # A container's end is the end of all its processes: leftovers (say, DDP workers of a crashed
    # launcher) would otherwise keep ports and GPUs. They share our process group.
    os.killpg(os.getpgid(0), signal.SIGKILL)
    return exit_code


def _prepare(spec: dict) -> str:
    """Namespaces, root, mounts and hostname; returns the command's executable."""
    _enter_namespaces()
    # Opened before any mount, then mounted from /proc/self/fd: an earlier mount may cover a source.
    # (After unshare: a bind mount's source must be a mount of our own namespace.)
    sources = [os.open(mount["source"], os.O_PATH) for mount in spec["mounts"]]
    _enter_own_root(spec["root"])
    _set_hostname(spec["hostname"])
    mounted: list[str] = []
    private: set[str] = set()
    for mount, source in zip(spec["mounts"], sources, strict=True):
        target = mount["target"]
        _ensure_mount_point(target, os.path.isdir(f"/proc/self/fd/{source}"), mounted, private)
        _bind(f"/proc/self/fd/{source}", target, mount.get("readOnly", False))
        mounted.append(os.path.realpath(target))
        os.close(source)
    working_dir = spec.get("workingDir") or "/"
    _ensure_mount_point(working_dir, True, mounted, private)
    os.chdir(working_dir)
    return _resolve(spec["argv"], spec["env"])


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


def _enter_own_root(root: str) -> None:
    """chroot into a tmpfs that holds bind mounts of everything in the host's /."""
    os.makedirs(root, exist_ok=True)
    _mount("tmpfs", root, 0, "tmpfs", "mode=755")
    for entry in os.scandir("/"):
        _replicate(entry, os.path.join(root, entry.name))
    os.chdir(root)
    os.chroot(".")
    os.chdir("/")


def _ensure_mount_point(target: str, is_dir: bool, mounted: list[str], private: set[str]) -> None:
    """Create a missing mount point where only the pod sees it."""
    if os.path.lexists(target):
        return
    existing = os.path.realpath(target)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    ours = (
        existing == "/"
        or existing in private
        or any(existing == volume or existing.startswith(volume + "/") for volume in mounted)
    )
    if not ours:  # a host folder: give the pod its own copy of it to create the mount point in
        _make_private(existing)
        private.add(existing)
    if is_dir:
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        Path(target).touch()


def _make_private(folder: str) -> None:
    """Cover folder with a tmpfs holding bind mounts of its entries: the same files, but new ones stay ours."""
    os.mkdir(STAGING)
    _mount(folder, STAGING, MS_BIND | MS_REC)
    _mount("tmpfs", folder, 0, "tmpfs", f"mode={os.stat(folder).st_mode & 0o7777:o}")
    for entry in os.scandir(STAGING):
        _replicate(entry, os.path.join(folder, entry.name))
    if _libc.umount2(STAGING.encode(), MNT_DETACH) != 0:
        raise OSError(ctypes.get_errno(), f"umount {STAGING}")
    os.rmdir(STAGING)


def _replicate(entry: os.DirEntry, target: str) -> None:
    """Make target show what entry is: the same symlink, or a bind mount of the folder or file."""
    if entry.is_symlink():
        os.symlink(os.readlink(entry.path), target)
    elif entry.is_dir(follow_symlinks=False):
        os.mkdir(target)
        _mount(entry.path, target, MS_BIND | MS_REC)
    else:
        Path(target).touch()
        _mount(entry.path, target, MS_BIND)


def _set_hostname(hostname: str) -> None:
    name = hostname.encode()
    if _libc.sethostname(name, len(name)) != 0:
        raise OSError(ctypes.get_errno(), f"sethostname {hostname}")


def _bind(source: str, target: str, read_only: bool) -> None:
    _mount(source, target, MS_BIND | MS_REC)
    if read_only:
        kept = os.statvfs(target).f_flag
        flags = MS_BIND | MS_REMOUNT | MS_RDONLY
        flags |= sum(ms_flag for st_flag, ms_flag in KEPT_MOUNT_FLAGS.items() if kept & st_flag)
        _mount(None, target, flags)


def _mount(source: str | None, target: str, flags: int, fstype: str | None = None, data: str | None = None) -> None:
    arguments = [None if value is None else value.encode() for value in (source, target, fstype)]
    if _libc.mount(*arguments, flags, data.encode() if data else None) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {source or fstype or ''} on {target}: {os.strerror(errno)}")


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


def _record_exit(exit_dir: int, exit_name: str, exit_code: int, reason: str, message: str | None) -> None:
    record = {
        "exitCode": exit_code,
        "reason": reason,
        "message": message,
        "finishedAt": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    partial = exit_name + ".partial"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=exit_dir)
    with os.fdopen(fd, "w") as out:
        json.dump(record, out)
    os.replace(partial, exit_name, src_dir_fd=exit_dir, dst_dir_fd=exit_dir)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
