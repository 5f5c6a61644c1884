"""The embedded cluster keeps its disk in check (issue 27): `cluster up`/`down` cycles leave nothing
behind (the images stay in the machine's one shared store), a node whose disk fills keeps its images,
and `cluster up` refuses a disk too small for a run in one line.

The full disk is a small ext4 filesystem on a loop device under the test's folder, not the machine's."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import kubernetes
import pytest
from kubernetes.client.rest import ApiException

from finetune_dev.cluster.controlplane import ControlPlane, cluster_down, cluster_up
from finetune_dev.cluster.disk import GIB
from finetune_dev.cluster.node import POD_LOGS, Node, leftovers
from finetune_dev.cluster.runtime import PAUSE_IMAGE, ctr, has_image, shared_image_store
from finetune_dev.harness import kubectl, wait_for
from tests.e2e.busybox import ensure_busybox_image

pytestmark = pytest.mark.integration

MB = 2**20
CYCLES = 10
# What ten cycles may leave: logs of the machine's kubelet or containerd outside the folders, at most.
FEW_MB = 5 * MB
PRESSURE_SECONDS = 120  # the eviction manager looks every 10 s; the node's status is written every 10 s


def embedded_only(kube) -> None:
    if kube.control_plane is None:
        pytest.skip("tests the embedded cluster; this session uses an existing cluster")
    if os.geteuid() != 0:
        pytest.skip("the embedded node needs root")


def disk_use(*places: Path) -> int:
    """Bytes of disk the places use (du: blocks, hard links once)."""
    existing = [str(place) for place in places if place.exists()]
    if not existing:
        return 0
    out = subprocess.run(["du", "-s", "-c", "-B1", *existing], capture_output=True, text=True, check=True).stdout
    return int(out.splitlines()[-1].split()[0])


@pytest.fixture
def short_folder() -> Iterator[Path]:
    """A folder with a short path (a containerd socket's path must fit 104 bytes), deleted after the test."""
    folder = Path(tempfile.mkdtemp(prefix="finetune-test-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 512 MiB ext4 filesystem (no reserved blocks) on a loop device, gone after the test. Mounted at a
    short path: the kubelet's sockets under it must fit a unix socket's 108 bytes."""
    if os.geteuid() != 0:
        pytest.skip("mounting a filesystem needs root")
    image = tmp_path / "disk.img"
    subprocess.run(["truncate", "-s", "512M", image], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", image], check=True)
    mount_point = Path(tempfile.mkdtemp(prefix="finetune-disk-"))
    subprocess.run(["mount", "-o", "loop", image, mount_point], check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", mount_point], check=True)
        mount_point.rmdir()


def test_ten_up_down_cycles_leave_no_more_than_a_few_mb_behind(kube, short_folder):
    embedded_only(kube)
    folder = short_folder / "cluster"
    places = (short_folder, shared_image_store(), POD_LOGS, Path("/var/log/containers"))
    cluster_up(folder)  # the first may import the images into the shared store: that is what it keeps
    address = ControlPlane(folder).node().containerd_address
    images = [line.split() for line in ctr(address, "images", "ls").splitlines()[1:]]
    named = {image[2] for image in images if not image[0].startswith("sha256:")}
    assert [image[0] for image in images if image[2] not in named] == []  # no replaced build kept by its ID
    cluster_down(folder)
    before, disk_before, started = disk_use(*places), _disk_used(), time.monotonic()

    for _ in range(CYCLES):
        cluster_up(folder)
        cluster_down(folder)

    after, disk_after = disk_use(*places), _disk_used()
    print(
        f"{CYCLES} cycles in {time.monotonic() - started:.0f} s: folders and image store {before / MB:.1f} -> "
        f"{after / MB:.1f} MB; the disk's used space {(disk_after - disk_before) / MB:+.0f} MB (other users too)",
        file=sys.stderr,
    )
    assert not folder.exists()
    assert leftovers(folder / "node") == []
    assert after - before <= FEW_MB


def test_cluster_down_keep_leaves_the_folder_to_debug(kube, tmp_path):
    embedded_only(kube)
    folder = tmp_path / "cluster"
    cluster_up(folder, with_node=False)
    cluster_down(folder, keep=True)
    assert (folder / "logs" / "kube-apiserver.log").exists()
    assert (folder / "etcd").is_dir()

    (folder / "notes.txt").write_text("mine\n")
    cluster_down(folder)
    assert sorted(path.name for path in folder.iterdir()) == ["notes.txt"]  # only what the cluster made goes


def test_cluster_up_on_a_disk_too_small_for_a_run_refuses_in_one_line(small_disk):
    folder = small_disk / "cluster"
    free = shutil.disk_usage(small_disk).free / GIB
    done = subprocess.run(
        [sys.executable, "-m", "finetune_operator", "cluster", "up", "--dir", str(folder)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stdout == ""
    line = done.stderr.strip()
    assert "\n" not in line
    assert line.startswith(
        f"error: only {free:.1f} GiB free on the disk of {folder}; a cluster run needs 5 GiB: delete "
    )
    assert "finetune cluster down --dir DIR" in line
    assert not folder.exists()  # refused before anything was made


def test_a_node_whose_disk_fills_keeps_its_images(kube, small_disk, tmp_path):
    """Filled past the old thresholds (1% free, in the kubelet's own stats), the node keeps its images and
    reports no DiskPressure."""
    embedded_only(kube)
    control_plane = kube.control_plane
    node = Node(small_disk / "node", control_plane.pki, control_plane.kubeconfig, image_store=small_disk / "images")
    core = kubernetes.client.CoreV1Api(kube.api_client())
    node.start()
    try:
        busybox = ensure_busybox_image(node.containerd_address, tmp_path)
        node.start()  # again: the kubelet finds the images at its start, as it finds the project's in the store
        free = os.statvfs(small_disk)
        filler_bytes = free.f_bavail * free.f_frsize - 2 * MB  # under 1% of 512 MiB left
        subprocess.run(["fallocate", "-l", str(filler_bytes), small_disk / "filler"], check=True)

        full_seen = wait_for(
            lambda: _full_in_stats(kube, node), PRESSURE_SECONDS, what="the kubelet to see the disk full"
        )
        # The eviction manager looks every 10 s: two of the node's status heartbeats later, still no pressure.
        wait_for(lambda: (_full_in_stats(kube, node) or 0) > full_seen + 21, PRESSURE_SECONDS, what="two looks")
        assert _condition(core, node.name, "DiskPressure") == "False"

        present = [ref for ref in (busybox, PAUSE_IMAGE) if has_image(node.containerd_address, ref)]
        reclaim = [line for line in _kubelet_log(node).splitlines() if "imageGCManager" in line or "reclaim" in line]
        assert present == [busybox, PAUSE_IMAGE], "\n".join(reclaim)
    finally:
        node.remove()
        with contextlib.suppress(ApiException):
            core.delete_node(node.name)


def _full_in_stats(kube, node: Node) -> float | None:
    """The time the kubelet's own summary (what its eviction manager reads) shows under 1% of its disk free."""
    path = f"/api/v1/nodes/{node.name}/proxy/stats/summary"
    raw = kubectl("get", "--raw", path, kubeconfig=kube.kubeconfig, check=False)
    if raw.returncode != 0:  # the restarted kubelet's new port is not in the Node's status yet
        return None
    summary = json.loads(raw.stdout)
    fs = summary["node"]["runtime"]["imageFs"]  # the store's filesystem, as the CRI reports it
    return time.time() if fs["availableBytes"] < fs["capacityBytes"] / 100 else None


def _kubelet_log(node: Node) -> str:
    return node.log_path("kubelet").read_text(errors="replace")


def _condition(core, node_name: str, kind: str) -> str | None:
    conditions = core.read_node(node_name).status.conditions or []
    return next((condition.status for condition in conditions if condition.type == kind), None)


def _disk_used() -> int:
    usage = os.statvfs("/")
    return (usage.f_blocks - usage.f_bfree) * usage.f_frsize
