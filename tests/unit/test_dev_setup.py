"""`make setup`'s Debian step (dev/finetune_dev/debian.py) and the disk check `cluster up` and `make test` run
(disk.py): one list of packages that covers what the code asks for, one line per outcome."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune_dev import debian
from finetune_dev.cluster import disk
from finetune_dev.cluster.errors import ClusterError
from finetune_dev.cluster.node import REQUIREMENTS

SCRIPT = Path(debian.__file__)


def run_script(*prefix: str, env: dict[str, str] | None = None, extra: str = "") -> subprocess.CompletedProcess[str]:
    """The script as `make setup` runs it (the system's python3, no virtualenv), optionally with a package added."""
    code = f"import sys; sys.path.insert(0, {str(SCRIPT.parent)!r}); import debian; {extra}sys.exit(debian.install())"
    return subprocess.run(
        [*prefix, "/usr/bin/python3", "-c", code], capture_output=True, text=True, env=env, timeout=60
    )


def test_the_list_holds_every_package_the_node_and_the_image_build_name():
    listed = set(debian.all_packages())
    assert set(REQUIREMENTS.values()) <= listed
    assert {"debootstrap", "buildah", "etcd-server", "busybox-static", *debian.KUBERNETES_BUILD} <= listed


def test_with_everything_installed_it_says_so_in_one_line_without_apt():
    if debian.missing_packages(debian.all_packages()) or not debian.has_deb_src():
        pytest.skip("this machine lacks some of the packages: the script would install them")
    done = run_script()
    assert done.returncode == 0
    assert (
        done.stdout
        == f"setup: the {len(debian.all_packages())} Debian packages the cluster, node and images need are installed\n"
    )


def test_not_root_it_names_the_missing_packages_in_one_line_and_goes_on():
    if os.geteuid() != 0:
        pytest.skip("drops to another user with setpriv, which needs root")
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    done = run_script(*nobody, extra="debian.PACKAGES['x'] = ('finetune-no-such-package',); ")
    assert done.returncode == 0
    lines = done.stdout.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("setup: not root, so not installing Debian packages: as root, ")
    assert lines[0].endswith("apt-get install --no-install-recommends finetune-no-such-package")


def test_off_debian_it_names_the_packages_in_one_line():
    done = run_script(env={"PATH": "/nonexistent"})
    assert done.returncode == 0
    assert done.stdout == f"setup: not a Debian system: install the equivalents of {' '.join(debian.all_packages())}\n"


def test_the_disk_check_names_the_free_space_and_what_to_delete(tmp_path):
    free = disk.shutil.disk_usage(tmp_path).free / disk.GIB
    needed = 10**6 * disk.GIB  # more than any disk has
    with pytest.raises(ClusterError) as refused:
        disk.check_free_space(tmp_path / "cluster", needed)
    message = str(refused.value)
    assert message.startswith(f"only {free:.1f} GiB free on the disk of {tmp_path / 'cluster'}; a cluster run needs")
    assert message.endswith("clusters you no longer use (`finetune cluster down --dir DIR`)")
    assert "\n" not in message


def test_the_disk_check_passes_with_room_and_says_how_much():
    done = subprocess.run([sys.executable, "-m", "finetune_dev.cluster.disk"], capture_output=True, text=True)
    if disk.shutil.disk_usage(".").free < disk.NEEDED_BYTES:
        assert done.returncode == 1
    else:
        assert done.returncode == 0
        assert done.stdout.startswith("disk: ") and done.stdout.endswith(" GiB free, a cluster run needs 5 GiB\n")
