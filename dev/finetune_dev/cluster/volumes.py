"""A local-node pod's volumes as local folders, and each container's mounts of them.

    configMap, secret, downwardAPI, projected   files written under NODE/pods/<uid>/volumes/<volume>/
                                                (mounted read-only, as Kubernetes does)
    emptyDir                                    an empty folder there, kept across container restarts
    persistentVolumeClaim                       the bound PersistentVolume's hostPath; the node's
                                                provisioner puts those at NODE/volumes/pvc/<ns>/<claim>/
    hostPath                                    the path itself

projected serviceAccountToken sources get a token from the TokenRequest API, bound to the pod.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from finetune_dev.cluster.containerenv import (
    ContainerConfigError,
    expand,
    field_value,
    resource_value,
)
from finetune_dev.cluster.kubeapi import Kube

DEFAULT_FILE_MODE = 0o644
DEFAULT_TOKEN_EXPIRATION_SECONDS = 3600
WRITTEN_VOLUME_TYPES = ("configMap", "secret", "downwardAPI", "projected")
HOST_PATH_CHECKS = {
    "Directory": Path.is_dir,
    "File": Path.is_file,
    "Socket": Path.is_socket,
    "CharDevice": Path.is_char_device,
    "BlockDevice": Path.is_block_device,
}


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool


@dataclass(frozen=True)
class LocalVolume:
    path: Path
    read_only: bool  # whatever the mount says: configMap, secret, downwardAPI and projected volumes


def claim_folder(node_dir: Path, namespace: str, claim: str) -> Path:
    """Where the node keeps the data of a PersistentVolumeClaim it provisioned."""
    return node_dir / "volumes" / "pvc" / namespace / claim


def prepare_volumes(
    pod: dict, pod_dir: Path, kube: Kube, node_allocatable: Mapping[str, str]
) -> dict[str, LocalVolume]:
    """Materialise every volume of the pod; raises ContainerConfigError for what is missing."""
    volumes = {}
    for volume in pod["spec"].get("volumes") or []:
        folder = pod_dir / "volumes" / volume["name"]
        kind = next((key for key in volume if key != "name"), None)
        if kind in WRITTEN_VOLUME_TYPES:
            # Files are rewritten in place, never replaced: running containers of the pod (say, after
            # an agent restart) see this folder through bind mounts of its inodes.
            folder.mkdir(parents=True, exist_ok=True)
            files = _volume_files(pod, kind, volume[kind], kube, node_allocatable)
            for relative_path, (data, mode) in files.items():
                _write_file(folder, relative_path, data, mode)
            volumes[volume["name"]] = LocalVolume(folder, read_only=True)
        elif kind == "emptyDir":
            folder.mkdir(parents=True, exist_ok=True)
            volumes[volume["name"]] = LocalVolume(folder, read_only=False)
        elif kind == "persistentVolumeClaim":
            claim = volume[kind]
            path = _claim_path(pod["metadata"]["namespace"], claim["claimName"], kube)
            volumes[volume["name"]] = LocalVolume(path, read_only=claim.get("readOnly", False))
        elif kind == "hostPath":
            volumes[volume["name"]] = LocalVolume(_host_path(volume[kind]), read_only=False)
        else:
            raise ContainerConfigError(f"volume {volume['name']!r}: type {kind!r} is not supported by the local node")
    return volumes


def container_mounts(container: dict, volumes: Mapping[str, LocalVolume], env: Mapping[str, str]) -> list[Mount]:
    mounts = []
    for volume_mount in container.get("volumeMounts") or []:
        volume = volumes.get(volume_mount["name"])
        if volume is None:
            raise ContainerConfigError(f"volumeMount {volume_mount['name']!r} names no volume of the pod")
        source = volume.path
        sub_path = volume_mount.get("subPath") or expand(volume_mount.get("subPathExpr") or "", env)
        if sub_path:
            source = source / sub_path
            # Workers of one gang start together and share the sub path: creating it must not race.
            if not source.exists():
                source.mkdir(parents=True, exist_ok=True)
        read_only = volume.read_only or volume_mount.get("readOnly", False)
        mounts.append(Mount(str(source), volume_mount["mountPath"], read_only))
    return mounts


def _volume_files(
    pod: dict, kind: str, source: dict, kube: Kube, node_allocatable: Mapping[str, str]
) -> dict[str, tuple[bytes, int]]:
    namespace = pod["metadata"]["namespace"]
    default_mode = source.get("defaultMode", DEFAULT_FILE_MODE)
    if kind == "configMap":
        found = kube.read_config_map(namespace, source["name"])
        return _keyed_files("configmap", source, found, _config_map_bytes(found), default_mode)
    if kind == "secret":
        found = kube.read_secret(namespace, source["secretName"])
        ref = {**source, "name": source["secretName"]}
        return _keyed_files("secret", ref, found, _secret_bytes(found), default_mode)
    if kind == "downwardAPI":
        return _downward_files(pod, source.get("items") or [], default_mode, node_allocatable)
    files = {}
    for projection in source.get("sources") or []:
        files.update(_projection_files(pod, projection, kube, default_mode, node_allocatable))
    return files


def _projection_files(
    pod: dict, projection: dict, kube: Kube, default_mode: int, node_allocatable: Mapping[str, str]
) -> dict[str, tuple[bytes, int]]:
    namespace = pod["metadata"]["namespace"]
    if "configMap" in projection:
        ref = projection["configMap"]
        found = kube.read_config_map(namespace, ref["name"])
        return _keyed_files("configmap", ref, found, _config_map_bytes(found), default_mode)
    if "secret" in projection:
        ref = projection["secret"]
        found = kube.read_secret(namespace, ref["name"])
        return _keyed_files("secret", ref, found, _secret_bytes(found), default_mode)
    if "downwardAPI" in projection:
        return _downward_files(pod, projection["downwardAPI"].get("items") or [], default_mode, node_allocatable)
    if "serviceAccountToken" in projection:
        request = projection["serviceAccountToken"]
        token = kube.create_token(
            namespace,
            pod["spec"].get("serviceAccountName") or "default",
            audiences=[request["audience"]] if request.get("audience") else [],
            expiration_seconds=request.get("expirationSeconds", DEFAULT_TOKEN_EXPIRATION_SECONDS),
            pod=pod,
        )
        return {request["path"]: (token.encode(), default_mode)}
    raise ContainerConfigError(f"projected volume source {sorted(projection)} is not supported by the local node")


def _keyed_files(
    kind: str, ref: dict, found: dict | None, data: dict[str, bytes], default_mode: int
) -> dict[str, tuple[bytes, int]]:
    """Files of a configMap or secret: the listed items, or one file per key."""
    if found is None:
        if ref.get("optional", False):
            return {}
        raise ContainerConfigError(f'{kind} "{ref["name"]}" not found')
    items = ref.get("items")
    if not items:
        return {key: (value, default_mode) for key, value in data.items()}
    files = {}
    for item in items:
        if item["key"] not in data:
            if ref.get("optional", False):
                continue
            raise ContainerConfigError(f'{kind} "{ref["name"]}" has no key {item["key"]!r}')
        files[item["path"]] = (data[item["key"]], item.get("mode", default_mode))
    return files


def _downward_files(
    pod: dict, items: list[dict], default_mode: int, node_allocatable: Mapping[str, str]
) -> dict[str, tuple[bytes, int]]:
    files = {}
    for item in items:
        if "fieldRef" in item:
            value = field_value(pod, item["fieldRef"]["fieldPath"])
        else:
            ref = item["resourceFieldRef"]
            value = resource_value(pod, ref.get("containerName", ""), ref, node_allocatable)
        files[item["path"]] = (value.encode(), item.get("mode", default_mode))
    return files


def _config_map_bytes(config_map: dict | None) -> dict[str, bytes]:
    config_map = config_map or {}
    data = {key: value.encode() for key, value in (config_map.get("data") or {}).items()}
    data.update({key: base64.b64decode(value) for key, value in (config_map.get("binaryData") or {}).items()})
    return data


def _secret_bytes(secret: dict | None) -> dict[str, bytes]:
    return {key: base64.b64decode(value) for key, value in ((secret or {}).get("data") or {}).items()}


def _write_file(folder: Path, relative_path: str, data: bytes, mode: int) -> None:
    relative = PurePosixPath(relative_path)
    if relative.is_absolute() or ".." in relative.parts:
        raise ContainerConfigError(f"volume file path {relative_path!r} must be relative, without '..'")
    path = folder / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)


def _claim_path(namespace: str, claim_name: str, kube: Kube) -> Path:
    claim = kube.read_pvc(namespace, claim_name)
    if claim is None:
        raise ContainerConfigError(f'persistentvolumeclaim "{claim_name}" not found')
    volume_name = claim["spec"].get("volumeName")
    volume = kube.read_pv(volume_name) if volume_name else None
    if volume is None:
        raise ContainerConfigError(f'persistentvolumeclaim "{claim_name}" is not bound to a volume yet')
    spec = volume["spec"]
    local_path = (spec.get("hostPath") or spec.get("local") or {}).get("path")
    if not local_path:
        raise ContainerConfigError(
            f"persistentvolume {volume_name!r} (claim {claim_name!r}) is neither hostPath nor local: "
            "the local node can only mount folders of this host"
        )
    path = Path(local_path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _host_path(source: dict) -> Path:
    path = Path(source["path"])
    kind = source.get("type") or ""
    if kind == "DirectoryOrCreate":
        path.mkdir(parents=True, exist_ok=True)
    elif kind == "FileOrCreate":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)
    elif kind in HOST_PATH_CHECKS and not HOST_PATH_CHECKS[kind](path):
        raise ContainerConfigError(f"hostPath {path} is not a {kind}")
    return path
