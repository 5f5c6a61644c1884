"""The node's container runtime: containerd (Debian's 1.6, whose CRI plugin speaks the v1alpha2 CRI of
kubelet 1.20) started with its own root, state and socket under the node's folder, and images packed
without a registry: a folder's files become a one-layer image in `docker save` layout, which
`ctr images import` loads into the CRI's namespace.

The images (content and unpacked snapshots, containerd's `root`) live in one store per machine,
~/.cache/finetune-operator/containerd, shared by every cluster's node in turn (one node runs at a
time): a new cluster finds the images imported before and copies nothing. What belongs to one node
(its state: sockets, mounts, runc's files) stays under that node's folder and goes with it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
from collections.abc import Mapping
from pathlib import Path

from finetune_dev.cluster.build import cache_root
from finetune_dev.cluster.errors import ClusterError

CRI_NAMESPACE = "k8s.io"
PAUSE_IMAGE = "localhost/finetune/pause:3.4.1"
CNI_BIN_DIR = "/usr/lib/cni"


def containerd_config(folder: Path, cni_conf_dir: Path, image_store: Path) -> str:
    """containerd's config.toml (version 2): its root (the images) in image_store, the rest under
    `folder`, CRI as REAL-NODE.md found working."""
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""version = 2
root = "{image_store}"
state = "{folder / "state"}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]

[grpc]
  address = "{socket_path(folder)}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{folder / "opt"}"

[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  disable_apparmor = true
  # root here lacks CAP_SYS_RESOURCE: runc could not give the pause process oom_score_adj -998.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true

[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
  Root = "{folder / "state" / "runc"}"

[{cri}.cni]
  bin_dir = "{CNI_BIN_DIR}"
  conf_dir = "{cni_conf_dir}"
"""


def shared_image_store() -> Path:
    """containerd's root for every node of this machine (see the module's docstring)."""
    return cache_root() / "containerd"


def socket_path(folder: Path) -> Path:
    return folder / "containerd.sock"


def ctr(address: Path | str, *args: str, check: bool = True, timeout: float = 120) -> str:
    """Run `ctr` against the containerd at address, in the CRI's namespace; return its output."""
    argv = ["ctr", "--address", str(address), "--namespace", CRI_NAMESPACE, *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise ClusterError(f"`{' '.join(argv)}` failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
    return done.stdout


def has_image(address: Path | str, ref: str) -> bool:
    return ref in ctr(address, "images", "list", "--quiet").split()


def import_image(address: Path | str, archive: Path) -> None:
    """Load an image archive (`docker save` or OCI layout) into containerd, unpacked for the CRI."""
    ctr(address, "images", "import", str(archive), timeout=900)


def pack_image(
    archive: Path,
    ref: str,
    files: Mapping[str, Path | bytes],
    *,
    entrypoint: list[str],
    symlinks: Mapping[str, str] | None = None,
    env: list[str] | None = None,
) -> Path:
    """Write a one-layer image in `docker save` layout to archive.

    files: path in the image -> a host file (copied, mode kept) or bytes (mode 0755);
    symlinks: path in the image -> target. Folders on the way are created 0755; /tmp is 1777.
    """
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        folders = {"tmp"} | {str(Path(p.strip("/")).parent) for p in [*files, *(symlinks or {})]} - {"."}
        for folder in sorted(_with_parents(folders)):
            info = tarfile.TarInfo(folder)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if folder == "tmp" else 0o755
            tar.addfile(info)
        for path, source in sorted(files.items()):
            data = source if isinstance(source, bytes) else source.read_bytes()
            info = tarfile.TarInfo(path.strip("/"))
            info.size = len(data)
            info.mode = 0o755 if isinstance(source, bytes) else os.stat(source).st_mode & 0o7777
            tar.addfile(info, io.BytesIO(data))
        for path, target in sorted((symlinks or {}).items()):
            info = tarfile.TarInfo(path.strip("/"))
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    layer_bytes = layer.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    config = {
        "architecture": _go_arch(),
        "os": "linux",
        "config": {"Entrypoint": entrypoint, "Env": env or ["PATH=/usr/local/bin:/usr/bin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }
    config_bytes = json.dumps(config).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [ref], "Layers": ["layer.tar"]}]).encode()
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w") as out:
        for name, data in (("layer.tar", layer_bytes), (config_name, config_bytes), ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
    return archive


def ensure_pause_image(address: Path | str, pause_binary: Path, work_dir: Path) -> None:
    """Import the sandbox image (the static `pause` built with the Kubernetes binaries) unless present."""
    if has_image(address, PAUSE_IMAGE):
        return
    archive = pack_image(work_dir / "pause.tar", PAUSE_IMAGE, {"/pause": pause_binary}, entrypoint=["/pause"])
    import_image(address, archive)
    archive.unlink()


def _with_parents(folders: set[str]) -> set[str]:
    every = set()
    for folder in folders:
        path = Path(folder)
        every |= {str(path), *(str(parent) for parent in path.parents if str(parent) != ".")}
    return every


def _go_arch() -> str:
    machine = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)
