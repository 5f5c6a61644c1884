"""The embedded cluster: a real Kubernetes control plane on loopback (controlplane.py), the binaries
it needs (build.py), and a real node: the kubelet over containerd, with pod networking and DNS (node.py).

    from finetune_dev.cluster import cluster_up, cluster_down, export_lines, ControlPlane, Node
"""

from __future__ import annotations

import importlib
from typing import Any

# Resolved on first use, so that `finetune` starts fast.
_EXPORTS = {
    "ClusterError": "finetune_dev.cluster.errors",
    "ControlPlane": "finetune_dev.cluster.controlplane",
    "cluster_up": "finetune_dev.cluster.controlplane",
    "cluster_down": "finetune_dev.cluster.controlplane",
    "export_lines": "finetune_dev.cluster.controlplane",
    "Node": "finetune_dev.cluster.node",
    "ensure_binaries": "finetune_dev.cluster.build",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
