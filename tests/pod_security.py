"""The Kubernetes Pod Security Standards (baseline and restricted, as of Kubernetes 1.30) as a pure check of
a pod spec, for the pods this project creates: the embedded 1.20 API server has no PodSecurity admission.

    level(pod_spec) -> "restricted" | "baseline" | "privileged"   # the strictest profile the pod meets
    violations(pod_spec, "restricted") -> ["containers[0]: capabilities.add IPC_LOCK", ...]
"""

from __future__ import annotations

from typing import Any

BASELINE_CAPABILITIES = {
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
SELINUX_TYPES = {None, "", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def _containers(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{kind}[{index}]", container)
        for kind in ("initContainers", "containers", "ephemeralContainers")
        for index, container in enumerate(spec.get(kind) or [])
    ]


def _baseline(spec: dict[str, Any]) -> list[str]:
    found = [f"{key}: true" for key in ("hostNetwork", "hostPID", "hostIPC") if spec.get(key)]
    pod_security = spec.get("securityContext") or {}
    found += [f"volumes[{v['name']}]: hostPath" for v in spec.get("volumes") or [] if "hostPath" in v]
    found += [f"sysctl {s['name']}" for s in pod_security.get("sysctls") or [] if s.get("name") not in SAFE_SYSCTLS]
    contexts = [("pod", pod_security)]
    for where, container in _containers(spec):
        security = container.get("securityContext") or {}
        contexts.append((where, security))
        if security.get("privileged"):
            found.append(f"{where}: privileged")
        for capability in (security.get("capabilities") or {}).get("add") or []:
            if capability not in BASELINE_CAPABILITIES:
                found.append(f"{where}: capabilities.add {capability}")
        found += [f"{where}: hostPort {p['hostPort']}" for p in container.get("ports") or [] if p.get("hostPort")]
        if security.get("procMount", "Default") != "Default":
            found.append(f"{where}: procMount {security['procMount']}")
    for where, security in contexts:
        if (security.get("windowsOptions") or {}).get("hostProcess"):
            found.append(f"{where}: windowsOptions.hostProcess")
        if (security.get("seccompProfile") or {}).get("type") == "Unconfined":
            found.append(f"{where}: seccompProfile Unconfined")
        if (security.get("appArmorProfile") or {}).get("type") == "Unconfined":
            found.append(f"{where}: appArmorProfile Unconfined")
        selinux = security.get("seLinuxOptions") or {}
        if selinux.get("type") not in SELINUX_TYPES or selinux.get("user") or selinux.get("role"):
            found.append(f"{where}: seLinuxOptions {selinux}")
    return found


def _restricted(spec: dict[str, Any]) -> list[str]:
    found = [
        f"volumes[{v['name']}]: {sorted(set(v) - {'name'})}"
        for v in spec.get("volumes") or []
        if not set(v) - {"name"} <= RESTRICTED_VOLUMES
    ]
    pod = spec.get("securityContext") or {}
    for where, container in _containers(spec):
        security = container.get("securityContext") or {}
        if security.get("allowPrivilegeEscalation") is not False:
            found.append(f"{where}: allowPrivilegeEscalation is not false")
        if security.get("runAsNonRoot", pod.get("runAsNonRoot")) is not True:
            found.append(f"{where}: runAsNonRoot is not true")
        if security.get("runAsUser", pod.get("runAsUser")) == 0:
            found.append(f"{where}: runAsUser 0")
        seccomp = (security.get("seccompProfile") or pod.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{where}: seccompProfile {seccomp}")
        capabilities = security.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            found.append(f"{where}: capabilities.drop lacks ALL")
        found += [f"{where}: capabilities.add {c}" for c in capabilities.get("add") or [] if c != "NET_BIND_SERVICE"]
    return found


def violations(spec: dict[str, Any], profile: str) -> list[str]:
    """What keeps the pod spec out of `profile` (baseline or restricted; restricted includes baseline)."""
    found = _baseline(spec)
    if profile == "restricted":
        found += _restricted(spec)
    return found


def level(spec: dict[str, Any]) -> str:
    for profile in ("restricted", "baseline"):
        if not violations(spec, profile):
            return profile
    return "privileged"
