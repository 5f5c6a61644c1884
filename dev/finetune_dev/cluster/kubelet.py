"""The kubelet's configuration, as pure builders: its KubeletConfiguration, kubeconfig and flags.

It serves its API on 127.0.0.1 only (the API server reaches it there for logs and exec, with a client
certificate the kubelet checks against the cluster's CA), advertises InternalIP 127.0.0.1, touches no
host iptables, and keeps its files under the node's folder, except what kubelet 1.20 fixes:
/var/log/pods and the `kubepods` cgroups.
"""

from __future__ import annotations

import base64
from pathlib import Path

import yaml

from finetune_dev.cluster.pki import NODE_NAME, NODE_USER, Pki
from finetune_dev.cluster.podnet import CLUSTER_DOMAIN, DNS_IP
from finetune_dev.cluster.runtime import PAUSE_IMAGE

# Memory only, no disk signal: under disk pressure the kubelet's one reclaim deletes every image no container
# uses, whatever the GC thresholds and the minimum age say (images present at its start count as infinitely
# old), and a node without a registry never gets them back; evicting the tests' pods frees nothing they did
# not need. `cluster up` and the tests check for room before they start instead (disk.py).
EVICTION_HARD = {"memory.available": "1Mi"}


def kubelet_config(folder: Path, pki: Pki, port: int, healthz_port: int) -> dict:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": "127.0.0.1",
        "port": port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": False},
            "x509": {"clientCAFile": str(pki.ca_cert)},
        },
        # Only holders of a certificate from the cluster's CA get past authentication: the API server.
        "authorization": {"mode": "AlwaysAllow"},
        "cgroupDriver": "cgroupfs",
        "cgroupsPerQOS": True,
        "enforceNodeAllocatable": [],
        "failSwapOn": False,
        "makeIPTablesUtilChains": False,
        "evictionHard": dict(EVICTION_HARD),
        "imageGCHighThresholdPercent": 100,  # 100: no periodic image GC
        "imageGCLowThresholdPercent": 99,
        "clusterDomain": CLUSTER_DOMAIN,
        "clusterDNS": [DNS_IP],
        "resolvConf": str(folder / "resolv.conf"),
        "volumePluginDir": str(folder / "volume-plugins"),
        "serializeImagePulls": False,
        "maxPods": 110,
    }


def kubelet_kubeconfig(server: str, pki: Pki) -> dict:
    ca_data = base64.b64encode(pki.ca_cert.read_bytes()).decode()
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "finetune", "cluster": {"server": server, "certificate-authority-data": ca_data}}],
        "users": [{"name": NODE_USER, "user": {"token": pki.node_token}}],
        "contexts": [{"name": "finetune", "context": {"cluster": "finetune", "user": NODE_USER}}],
        "current-context": "finetune",
    }


def write_kubelet_files(
    folder: Path, server: str, pki: Pki, runtime_socket: Path, port: int, healthz_port: int
) -> list[str]:
    """Write the kubelet's config files into folder; return its flags."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "resolv.conf").write_text("")
    (folder / "config.yaml").write_text(yaml.safe_dump(kubelet_config(folder, pki, port, healthz_port)))
    kubeconfig = folder / "kubeconfig"
    kubeconfig.touch(mode=0o600)
    kubeconfig.write_text(yaml.safe_dump(kubelet_kubeconfig(server, pki)))
    return kubelet_flags(folder, runtime_socket)


def kubelet_flags(folder: Path, runtime_socket: Path) -> list[str]:
    return [
        f"--config={folder / 'config.yaml'}",
        f"--kubeconfig={folder / 'kubeconfig'}",
        f"--root-dir={folder / 'root'}",
        f"--cert-dir={folder / 'pki'}",
        "--container-runtime=remote",
        f"--container-runtime-endpoint=unix://{runtime_socket}",
        f"--pod-infra-container-image={PAUSE_IMAGE}",
        "--node-ip=127.0.0.1",
        f"--hostname-override={NODE_NAME}",
        "--node-labels=finetune.dev/local-node=true",
        "--v=1",
    ]
