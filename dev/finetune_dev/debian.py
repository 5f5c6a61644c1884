"""The Debian packages that the embedded cluster, its node, the images and the tests need; `make setup`
installs the missing ones, one line per step saying what and why. Standard library only: it runs with
the system's python3 before the virtualenv exists.

    python3 dev/finetune_dev/debian.py     # nothing to do: one line, no apt-get update
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

# The Kubernetes build from Debian's kubernetes source package (build.py installs them itself if missing).
KUBERNETES_BUILD = (
    "golang-go",
    "golang-github-modern-go-reflect2-dev",
    "rsync",
    "dpkg-dev",
    "gcc",
    "libc6-dev",
    "make",
)
# why -> the packages, installed in this order (with --no-install-recommends).
PACKAGES: dict[str, tuple[str, ...]] = {
    "for the virtualenv": ("python3-venv",),
    "to build the Kubernetes binaries from Debian's kubernetes source package": KUBERNETES_BUILD,
    "for the control plane's etcd": ("etcd-server",),
    "for the embedded node: containerd 1.6 (the CRI of kubelet 1.20), runc, CNI bridge, cluster DNS": (
        "containerd",
        "runc",
        "containernetworking-plugins",
        "dnsmasq-base",
        "iptables",
        "iproute2",
        "procps",
        "mount",
    ),
    "to build the images without Docker: a debootstrap base, buildah for the Dockerfiles": ("debootstrap", "buildah"),
    "for the tests: the busybox image, small filesystems for the disk tests": ("busybox-static", "e2fsprogs"),
}
SOURCES = Path("/etc/apt/sources.list.d")
BINARY_SOURCES = SOURCES / "debian.sources"
DEB_SRC_LIST = SOURCES / "finetune-deb-src.sources"
DEB_SRC_WHY = "`apt-get source kubernetes` builds the control plane and the kubelet"


def all_packages() -> list[str]:
    return [package for packages in PACKAGES.values() for package in packages]


def missing_packages(packages: list[str]) -> list[str]:
    """Those of packages that dpkg does not have installed."""
    query = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${Status}\n", *packages], capture_output=True, text=True)
    installed = {line.split()[0] for line in query.stdout.splitlines() if line.endswith(" installed")}
    return [package for package in packages if package not in installed]


def has_deb_src() -> bool:
    """True if some apt source (one-line or deb822) enables source packages."""
    for path in [Path("/etc/apt/sources.list"), *SOURCES.glob("*")]:
        if path.is_file() and path.suffix in (".list", ".sources", ""):
            for line in path.read_text(errors="replace").splitlines():
                words = line.split()
                if words[:1] == ["deb-src"] or (words[:1] == ["Types:"] and "deb-src" in words):
                    return True
    return False


def enable_deb_src() -> None:
    """Add the source twin of Debian's own deb822 sources (the same mirrors and suites)."""
    if not BINARY_SOURCES.exists():
        raise SetupError(f"cannot enable deb-src: {BINARY_SOURCES} not found; add a deb-src line for bookworm yourself")
    stanzas = BINARY_SOURCES.read_text().replace("Types: deb\n", "Types: deb-src\n")
    DEB_SRC_LIST.write_text(stanzas)


class SetupError(Exception):
    """A step that failed, said in one line."""


def apt_get(*args: str) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    done = subprocess.run(["apt-get", *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        raise SetupError(f"`apt-get {' '.join(args)}` failed (exit {done.returncode}): {tail}")


def install() -> int:
    """Install what is missing; say each step in one line. Returns the exit status."""
    if not shutil.which("dpkg-query") or not shutil.which("apt-get"):
        print(f"setup: not a Debian system: install the equivalents of {' '.join(all_packages())}")
        return 0
    missing = missing_packages(all_packages())
    deb_src = has_deb_src()
    if not missing and deb_src:
        print(f"setup: the {len(all_packages())} Debian packages the cluster, node and images need are installed")
        return 0
    if os.geteuid() != 0:
        steps = [] if deb_src else ["enable deb-src in your apt sources"]
        steps += [f"apt-get install --no-install-recommends {' '.join(missing)}"] if missing else []
        print(f"setup: not root, so not installing Debian packages: as root, {'; then '.join(steps)}")
        return 0
    try:
        if not deb_src:
            print(f"setup: enabling deb-src in {DEB_SRC_LIST} ({DEB_SRC_WHY})")
            enable_deb_src()
        print(f"setup: apt-get update ({len(missing)} packages to install{'' if deb_src else ', deb-src enabled'})")
        apt_get("update", "-qq")
        for why, packages in PACKAGES.items():
            wanted = [package for package in packages if package in missing]
            if wanted:
                print(f"setup: installing {' '.join(wanted)} ({why})")
                apt_get("install", "-y", "-qq", "--no-install-recommends", *wanted)
    except SetupError as error:
        print(f"setup: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # each step shows as it starts
    sys.exit(install())
