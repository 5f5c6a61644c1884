"""A tiny image for node tests, made here without a registry: Debian's static busybox and its applets."""

from __future__ import annotations

import subprocess
from pathlib import Path

from finetune_dev.cluster.runtime import has_image, import_image, pack_image

BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static
IMAGE = "localhost/finetune/busybox:test"


def ensure_busybox_image(containerd_address: Path, work_dir: Path) -> str:
    """Import the busybox image into the node's containerd unless it has it; return its reference."""
    if not has_image(containerd_address, IMAGE):
        applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()
        links = {f"/bin/{applet}": "busybox" for applet in applets if applet != "busybox"}
        archive = pack_image(
            work_dir / "busybox.tar", IMAGE, {"/bin/busybox": BUSYBOX}, entrypoint=["/bin/sh"], symlinks=links
        )
        import_image(containerd_address, archive)
    return IMAGE
