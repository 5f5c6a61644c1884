"""The node's pod network, inside namespaces the project creates: a bridge of its own with no address
on the host (pods reach each other, nothing leaves it), CNI's bridge plugin attaching pods to it, and
one more network namespace, `finetune-dns`, joined to the bridge by a veth, where cluster DNS (dnsmasq)
and the pods' way to the API server (a forwarder listening on the `kubernetes` Service address) live.
The kubelet reaches pods (probes) through that namespace too, over a second veth whose host end has an
address outside the pod range; the namespace routes between the two.

    10.244.0.0/24   pods (host-local IPAM from .10)
    10.244.0.2      the DNS namespace: dnsmasq on port 53
    10.0.0.1:443    the `kubernetes` Service address, on the DNS namespace's loopback; pods route the
                    Service range through 10.244.0.2
    10.245.0.0/30   host (.1) <-> DNS namespace (.2); the host routes the pod range through .2, pods
                    route this link through 10.244.0.2

There is one such network per machine (the kubelet's log and cgroup paths are global anyway).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from finetune_dev.cluster.errors import ClusterError
from finetune_dev.cluster.pki import KUBERNETES_SERVICE_IP, SERVICE_CLUSTER_IP_RANGE

BRIDGE = "finetune0"
DNS_NETNS = "finetune-dns"
VETH_HOST = "ftdns-host"
VETH_NETNS = "ftdns-ns"
TRANSIT_HOST_LINK, TRANSIT_NETNS_LINK = "ftnode-host", "ftnode-ns"
TRANSIT_SUBNET, TRANSIT_HOST_IP, TRANSIT_NETNS_IP = "10.245.0.0/30", "10.245.0.1", "10.245.0.2"
POD_SUBNET = "10.244.0.0/24"
DNS_IP = "10.244.0.2"
POD_RANGE_START = "10.244.0.10"
POD_RANGE_END = "10.244.0.250"
CLUSTER_DOMAIN = "cluster.local"


def cni_config(ipam_dir: Path) -> dict:
    """The CNI network list: pods on BRIDGE, no gateway and no masquerade, the Service range via DNS_IP."""
    return {
        "cniVersion": "0.4.0",
        "name": "finetune",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": False,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(ipam_dir),
                    "ranges": [[{"subnet": POD_SUBNET, "rangeStart": POD_RANGE_START, "rangeEnd": POD_RANGE_END}]],
                    "routes": [{"dst": SERVICE_CLUSTER_IP_RANGE, "gw": DNS_IP}, {"dst": TRANSIT_SUBNET, "gw": DNS_IP}],
                },
            }
        ],
    }


def write_cni_config(conf_dir: Path, ipam_dir: Path) -> None:
    conf_dir.mkdir(parents=True, exist_ok=True)
    (conf_dir / "10-finetune.conflist").write_text(json.dumps(cni_config(ipam_dir), indent=2) + "\n")


def hosts_lines(pods: list[dict]) -> list[str]:
    """The DNS names of pods with a hostname and subdomain (`H.S.NS.svc` and `H.S.NS.svc.cluster.local`),
    and the `kubernetes` Service's, in hosts-file form."""
    service = "kubernetes.default.svc"
    lines = [f"{KUBERNETES_SERVICE_IP} {service} {service}.{CLUSTER_DOMAIN}"]
    for pod in pods:
        spec, ip = pod.get("spec") or {}, (pod.get("status") or {}).get("podIP")
        if ip and spec.get("hostname") and spec.get("subdomain") and not spec.get("hostNetwork"):
            name = f"{spec['hostname']}.{spec['subdomain']}.{pod['metadata']['namespace']}.svc"
            lines.append(f"{ip} {name} {name}.{CLUSTER_DOMAIN}")
    return lines


def dnsmasq_argv(hosts_file: Path) -> list[str]:
    """dnsmasq answering from hosts_file only (it never forwards), to be run inside DNS_NETNS."""
    return [
        "ip",
        "netns",
        "exec",
        DNS_NETNS,
        "dnsmasq",
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        f"--addn-hosts={hosts_file}",
        f"--listen-address={DNS_IP}",
        "--bind-interfaces",
        f"--local=/{CLUSTER_DOMAIN}/",
        "--local=/svc/",
        "--user=root",
        "--pid-file=",
        "--log-facility=-",
    ]


def set_up() -> None:
    """Create the bridge and the DNS namespace with its veth (after removing any left by a crash)."""
    tear_down()
    for argv in (
        ["ip", "link", "add", BRIDGE, "type", "bridge"],
        ["ip", "link", "set", BRIDGE, "up"],
        ["ip", "netns", "add", DNS_NETNS],
        ["ip", "link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_NETNS],
        ["ip", "link", "set", VETH_NETNS, "netns", DNS_NETNS],
        ["ip", "link", "set", VETH_HOST, "master", BRIDGE, "up"],
        ["ip", "-n", DNS_NETNS, "addr", "add", f"{DNS_IP}/24", "dev", VETH_NETNS],
        ["ip", "-n", DNS_NETNS, "link", "set", VETH_NETNS, "up"],
        ["ip", "-n", DNS_NETNS, "addr", "add", f"{KUBERNETES_SERVICE_IP}/32", "dev", "lo"],
        ["ip", "-n", DNS_NETNS, "link", "set", "lo", "up"],
        ["ip", "link", "add", TRANSIT_HOST_LINK, "type", "veth", "peer", "name", TRANSIT_NETNS_LINK],
        ["ip", "link", "set", TRANSIT_NETNS_LINK, "netns", DNS_NETNS],
        ["ip", "addr", "add", f"{TRANSIT_HOST_IP}/30", "dev", TRANSIT_HOST_LINK],
        ["ip", "link", "set", TRANSIT_HOST_LINK, "up"],
        ["ip", "-n", DNS_NETNS, "addr", "add", f"{TRANSIT_NETNS_IP}/30", "dev", TRANSIT_NETNS_LINK],
        ["ip", "-n", DNS_NETNS, "link", "set", TRANSIT_NETNS_LINK, "up"],
        ["ip", "netns", "exec", DNS_NETNS, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"],
        ["ip", "route", "add", POD_SUBNET, "via", TRANSIT_NETNS_IP, "dev", TRANSIT_HOST_LINK],
    ):
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            raise ClusterError(f"pod network: `{' '.join(argv)}` failed: {done.stderr.strip()}")


def tear_down() -> None:
    """Remove the DNS namespace, the veths and the bridge, whichever exist (the host's route goes with its link)."""
    if Path(f"/run/netns/{DNS_NETNS}").exists():
        subprocess.run(["ip", "netns", "delete", DNS_NETNS], capture_output=True)
    for link in (VETH_HOST, TRANSIT_HOST_LINK, BRIDGE):
        if Path(f"/sys/class/net/{link}").exists():
            subprocess.run(["ip", "link", "delete", link], capture_output=True)


def leftovers() -> list[str]:
    """What of this network exists now (empty once torn down)."""
    found = [f"netns {DNS_NETNS}"] if Path(f"/run/netns/{DNS_NETNS}").exists() else []
    links = (VETH_HOST, TRANSIT_HOST_LINK, BRIDGE)
    return found + [f"link {link}" for link in links if Path(f"/sys/class/net/{link}").exists()]
