"""The embedded cluster: a real Kubernetes control plane on loopback (controlplane.py), the binaries
it needs (build.py), and a local node agent that runs pods as local processes (node.py).

    from finetune_operator.cluster import cluster_up, cluster_down, export_lines, ControlPlane
"""

from __future__ import annotations

import importlib
from typing import Any

# Resolved on first use: the pod sandbox (sandbox.py) imports this package and must start fast.
_EXPORTS = {
    "ClusterError": "finetune_operator.cluster.errors",
    "ControlPlane": "finetune_operator.cluster.controlplane",
    "cluster_up": "finetune_operator.cluster.controlplane",
    "cluster_down": "finetune_operator.cluster.controlplane",
    "export_lines": "finetune_operator.cluster.controlplane",
    "LocalNode": "finetune_operator.cluster.localnode",
    "ensure_binaries": "finetune_operator.cluster.build",
    "pod_log_path": "finetune_operator.cluster.localnode",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
