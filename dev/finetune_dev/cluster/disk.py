"""The disk a cluster run needs: `cluster up` and `make test` refuse to start below it, with one line
naming the free space and what to delete, instead of a node that later taints itself `disk-pressure`.

    python -m finetune_dev.cluster.disk [--dir CLUSTER_DIR]    # exit 1 with that line when short
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from finetune_dev.cluster.build import cache_root
from finetune_dev.cluster.errors import ClusterError

GIB = 2**30
# The images' first import into the shared store (content plus unpacked layers, about 3 GiB), then what
# the e2e suite writes while it runs (etcd, logs, claims, checkpoints: under 1 GiB), with room to spare.
NEEDED_BYTES = 5 * GIB


def check_free_space(cluster_folder: Path, needed: int = NEEDED_BYTES) -> None:
    """Raise ClusterError unless each filesystem a run writes to (the cluster's folder, the cache with
    the image store) has `needed` bytes free."""
    for place in (Path(cluster_folder), cache_root()):
        free = shutil.disk_usage(_existing(place)).free
        if free < needed:
            raise ClusterError(
                f"only {free / GIB:.1f} GiB free on the disk of {place}; a cluster run needs {needed / GIB:.0f} GiB: "
                f"delete {', '.join(deletable())}"
            )


def deletable() -> list[str]:
    """What this project leaves on a machine that can go, most likely first."""
    found = [
        f"old test folders ({folder})"
        for folder in sorted(Path(tempfile.gettempdir()).glob("pytest-of-*"))
        if any(folder.iterdir())
    ]
    storage = cache_root() / "images" / "storage"
    if storage.is_dir():
        found.append(f"buildah's layer cache ({storage}; rebuilt when needed)")
    found.append("clusters you no longer use (`finetune cluster down --dir DIR`)")
    return found


def _existing(path: Path) -> Path:
    """path, or its nearest folder that exists (a cluster folder is made at start)."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune_dev.cluster.disk", description=__doc__)
    parser.add_argument("--dir", default=os.getcwd(), help="where the cluster's folder will be")
    args = parser.parse_args(argv)
    try:
        check_free_space(Path(args.dir))
    except ClusterError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    free = shutil.disk_usage(_existing(Path(args.dir))).free
    print(f"disk: {free / GIB:.1f} GiB free, a cluster run needs {NEEDED_BYTES / GIB:.0f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
