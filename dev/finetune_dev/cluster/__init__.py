"""The embedded cluster: a real Kubernetes control plane on loopback (controlplane.py), the binaries
it needs (build.py), and a local node agent that runs pods as local processes (node.py).

    from finetune_dev.cluster import cluster_up, cluster_down, export_lines, ControlPlane
"""

from __future__ import annotations

import importlib
from typing import Any

# Resolved on first use: the pod sandbox (sandbox.py) imports this package and must start fast.
_EXPORTS = {
    "ClusterError": "finetune_dev.cluster.errors",
    "ControlPlane": "finetune_dev.cluster.controlplane",
    "cluster_up": "finetune_dev.cluster.controlplane",
    "cluster_down": "finetune_dev.cluster.controlplane",
    "export_lines": "finetune_dev.cluster.controlplane",
    "LocalNode": "finetune_dev.cluster.localnode",
    "ensure_binaries": "finetune_dev.cluster.build",
    "pod_log_path": "finetune_dev.cluster.localnode",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
