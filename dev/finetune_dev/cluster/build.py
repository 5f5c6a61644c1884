"""Provides the embedded cluster's binaries: kube-apiserver, kube-controller-manager, kube-scheduler,
kubectl and the kubelet v1.20.2, plus etcd, and a static `pause` (the pod sandbox's process).

Looked up in this order: the folder named by $FINETUNE_K8S_ASSETS (like envtest's KUBEBUILDER_ASSETS),
the cache (~/.cache/finetune-operator/k8s-v1.20.2/bin), a finished build in the source folder; else
they are built from Debian's `kubernetes` source package by DESIGN.md's recipe (about 10 minutes on
2 cores, once). The kubelet is built with its refusal of a loopback --node-ip removed: the embedded
node advertises 127.0.0.1, so the API server reaches it (logs, exec) without the host's own address.
Prebuild from a shell, e.g. in CI:

    python -m finetune_dev.cluster.build        # prints the folder holding the binaries
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from finetune_dev import debian
from finetune_dev.cluster.errors import ClusterError

log = logging.getLogger(__name__)

K8S_VERSION = "v1.20.2"
CONTROL_PLANE_BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
NODE_BINARIES = ("kubelet", "pause")
ALL_BINARIES = (*CONTROL_PLANE_BINARIES, *NODE_BINARIES)
ASSETS_ENV = "FINETUNE_K8S_ASSETS"

SOURCE_PACKAGE = "kubernetes"
SOURCE_FOLDER = "kubernetes-1.20.5+really1.20.2"
MAKE_TARGETS = "cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler cmd/kubectl cmd/kubelet"
PAUSE_SOURCE = Path("build/pause/linux/pause.c")
NODE_STATUS_SOURCE = Path("pkg/kubelet/kubelet_node_status.go")
LOOPBACK_CHECK = """\tif nodeIP.IsLoopback() {
\t\treturn fmt.Errorf("nodeIP can't be loopback address")
\t}
"""
# The vendored reflect2 1.0.1 crashes under Go >= 1.18; Debian ships the fixed 1.0.2.
DEBIAN_REFLECT2 = Path("/usr/share/gocode/src/github.com/modern-go/reflect2")
VENDORED_REFLECT2 = Path("vendor/github.com/modern-go/reflect2")


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "finetune-operator"


def cached_bin_dir() -> Path:
    return cache_root() / f"k8s-{K8S_VERSION}" / "bin"


def source_dir() -> Path:
    return cache_root() / "src" / SOURCE_FOLDER


def ensure_binaries(node: bool = False) -> Path:
    """Return a folder holding the control-plane binaries (and with node=True the kubelet and pause),
    building them if nothing else has them."""
    names = ALL_BINARIES if node else CONTROL_PLANE_BINARIES
    assets = os.environ.get(ASSETS_ENV)
    if assets:
        return _checked_assets(Path(assets), names)
    bin_dir = cached_bin_dir()
    if _holds(bin_dir, names):
        return bin_dir
    with exclusive_lock(cache_root() / "build.lock", "Kubernetes"):
        if _holds(bin_dir, ALL_BINARIES):  # another process built it while we waited
            return bin_dir
        built = source_dir() / "_output" / "bin"
        if not _holds_working(built):
            build_from_source()
        _install(built, bin_dir)
    return bin_dir


def find_etcd(bin_dir: Path | None = None) -> Path:
    """etcd from the assets folder when it has one, else from PATH (Debian's etcd-server)."""
    candidates = [bin_dir / "etcd"] if bin_dir else []
    on_path = shutil.which("etcd")
    candidates += [Path(on_path)] if on_path else []
    candidates.append(Path("/usr/bin/etcd"))
    for candidate in candidates:
        if os.access(candidate, os.X_OK):
            return candidate
    raise ClusterError(
        "etcd not found: install it (`apt-get install etcd-server`) or put an etcd binary in the "
        f"folder named by ${ASSETS_ENV}"
    )


def build_from_source() -> None:
    """Build the binaries in the source folder by DESIGN.md's recipe; output lands in _output/bin."""
    src = source_dir()
    src.parent.mkdir(parents=True, exist_ok=True)
    _ensure_build_packages()
    if not (src / "Makefile").exists():
        log.info("fetching the %s source package into %s", SOURCE_PACKAGE, src.parent)
        _ensure_deb_src()
        _run(["apt-get", "source", SOURCE_PACKAGE], cwd=src.parent)
    _use_debian_reflect2(src)
    _allow_loopback_node_ip(src)
    gopath_link = src / ".go" / "src" / "k8s.io" / "kubernetes"
    if not gopath_link.is_symlink():
        gopath_link.parent.mkdir(parents=True, exist_ok=True)
        gopath_link.symlink_to("../../..")
    build_log = src.parent / "build.log"
    log.info("building %s (about 5 minutes on 2 cores); output in %s", MAKE_TARGETS, build_log)
    env = {**os.environ, "GOPATH": str(src / ".go"), "CGO_ENABLED": "0"}
    with build_log.open("wb") as out:
        make = subprocess.run(["make", f"WHAT={MAKE_TARGETS}"], cwd=src, env=env, stdout=out, stderr=subprocess.STDOUT)
    if make.returncode != 0:
        raise ClusterError(
            f"building Kubernetes failed (make exited {make.returncode}); see {build_log}:\n" + _tail(build_log)
        )
    pause = src / "_output" / "bin" / "pause"
    _run(["gcc", "-static", "-O2", "-DVERSION=v3.4.1", "-o", str(pause), str(src / PAUSE_SOURCE)])
    log.info("build finished")


def _allow_loopback_node_ip(src: Path) -> None:
    source = src / NODE_STATUS_SOURCE
    text = source.read_text()
    if LOOPBACK_CHECK in text:
        source.write_text(text.replace(LOOPBACK_CHECK, "", 1))
    elif "nodeIP can't be loopback address" in text:
        raise ClusterError(f"{source}: the loopback check to remove has an unexpected form")


def _checked_assets(folder: Path, names: tuple[str, ...]) -> Path:
    if not _holds(folder, names):
        missing = [name for name in names if not os.access(folder / name, os.X_OK)]
        raise ClusterError(f"${ASSETS_ENV}={folder} lacks executable {', '.join(missing)}")
    return folder


def _holds(folder: Path, names: tuple[str, ...]) -> bool:
    return all(os.access(folder / name, os.X_OK) for name in names)


def _holds_working(folder: Path) -> bool:
    """Like _holds, but also runs each Kubernetes binary: a build still linking leaves broken files."""
    if not _holds(folder, ALL_BINARIES):
        return False
    for name in (*CONTROL_PLANE_BINARIES, "kubelet"):
        probe = subprocess.run([folder / name, "--version"], capture_output=True)
        if probe.returncode != 0:
            return False
    return True


def _install(built: Path, bin_dir: Path) -> None:
    """Copy the binaries into the cache under a temporary name, then rename, so the cache is never half full."""
    partial = bin_dir.with_name(f"{bin_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name in ALL_BINARIES:
        shutil.copy2(built / name, partial / name)
    shutil.rmtree(bin_dir, ignore_errors=True)
    partial.rename(bin_dir)
    log.info("installed %s into %s", ", ".join(ALL_BINARIES), bin_dir)


@contextlib.contextmanager
def exclusive_lock(lock_path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive file lock so that concurrent callers build `what` once and the others wait."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is building %s; waiting for it (lock %s)", what, lock_path)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _ensure_build_packages() -> None:
    """What `make setup` installs; here too for a build started otherwise (CI's prebuild, a first test)."""
    missing = debian.missing_packages([*debian.KUBERNETES_BUILD, "etcd-server"])
    if missing:
        log.info("installing %s", " ".join(missing))
        _require_root(f"installing {' '.join(missing)}")
        _debian_step(debian.apt_get, "install", "-y", "--no-install-recommends", *missing)


def _ensure_deb_src() -> None:
    """Enable Debian source repositories (needed by `apt-get source`) unless some are enabled already."""
    if debian.has_deb_src():
        return
    _require_root("enabling deb-src repositories")
    _debian_step(debian.enable_deb_src)
    log.info("enabled deb-src in %s; running apt-get update", debian.DEB_SRC_LIST)
    _debian_step(debian.apt_get, "update")


def _debian_step(step: Callable[..., None], *args: str) -> None:
    try:
        step(*args)
    except debian.SetupError as error:
        raise ClusterError(str(error)) from error


def _use_debian_reflect2(src: Path) -> None:
    vendored = src / VENDORED_REFLECT2
    if not DEBIAN_REFLECT2.is_dir():
        raise ClusterError(f"{DEBIAN_REFLECT2} missing: apt-get install golang-github-modern-go-reflect2-dev")
    shutil.rmtree(vendored, ignore_errors=True)
    shutil.copytree(DEBIAN_REFLECT2, vendored, symlinks=True)
    (vendored / "go.mod").unlink(missing_ok=True)


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise ClusterError(
            f"{what} needs root: run `sudo {sys.executable} -m finetune_dev.cluster.build` once, or set "
            f"${ASSETS_ENV} to a folder holding {', '.join(CONTROL_PLANE_BINARIES)} (any v1.20+ build works)"
        )


def _run(argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise ClusterError(f"`{' '.join(argv)}` failed (exit {done.returncode}):\n{done.stderr[-2000:]}")


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        bin_dir = ensure_binaries(node=True)
        find_etcd(bin_dir)
    except ClusterError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(bin_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
