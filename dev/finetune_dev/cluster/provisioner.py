"""Storage for the local node, like k3s's local-path provisioner: every PersistentVolumeClaim without a
storage class (or with class `local-path`) gets a hostPath PersistentVolume, pre-bound to it, at
NODE/volumes/pvc/<namespace>/<claim>/. The scheduler will not place a pod whose claim is unbound, so
without this no job with `storage:` could run. Deleting the claim deletes the volume and its data.

hostPath volumes ignore fsGroup, so each folder is made owned by the workers' user and group (the
operator's pod security context): the non-root trainer can write its checkpoints there."""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path

from kubernetes.client.rest import ApiException

from finetune_dev.cluster.kubeapi import Kube
from finetune_operator.builders import WORKER_UID

log = logging.getLogger(__name__)

PROVISIONER_NAME = "finetune.dev/local-path"
LOCAL_STORAGE_CLASS = "local-path"
PROVISIONED_BY = "pv.kubernetes.io/provisioned-by"


def claim_folder(node_dir: Path, namespace: str, claim: str) -> Path:
    """Where the node keeps the data of a PersistentVolumeClaim it provisioned."""
    return node_dir / "volumes" / "pvc" / namespace / claim


def volume_name(claim: dict) -> str:
    return f"pvc-{claim['metadata']['uid']}"


def wants_local_volume(claim: dict) -> bool:
    spec, status = claim["spec"], claim.get("status") or {}
    return (
        not spec.get("volumeName")
        and status.get("phase", "Pending") == "Pending"
        and spec.get("storageClassName") in (None, "", LOCAL_STORAGE_CLASS)
        and "deletionTimestamp" not in claim["metadata"]
    )


def build_volume(claim: dict, path: Path) -> dict:
    metadata, spec = claim["metadata"], claim["spec"]
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": volume_name(claim), "annotations": {PROVISIONED_BY: PROVISIONER_NAME}},
        "spec": {
            "capacity": {"storage": ((spec.get("resources") or {}).get("requests") or {}).get("storage", "1Gi")},
            "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
            "volumeMode": "Filesystem",
            "storageClassName": spec.get("storageClassName") or "",
            # Deleted by us (below), not by the PV controller, which knows no deleter for hostPath.
            "persistentVolumeReclaimPolicy": "Delete",
            "hostPath": {"path": str(path), "type": "DirectoryOrCreate"},
            "claimRef": {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "namespace": metadata["namespace"],
                "name": metadata["name"],
                "uid": metadata["uid"],
            },
        },
    }


class LocalPathProvisioner:
    def __init__(self, kube: Kube, node_dir: Path):
        self.kube = kube
        self.node_dir = node_dir

    def run(self, stop: threading.Event) -> None:
        self._delete_released_volumes()
        self.kube.watch_pvcs(self._on_claim, stop)

    def _on_claim(self, event_type: str, claim: dict) -> None:
        try:
            if event_type == "DELETED":
                self._delete_volume(claim)
            elif wants_local_volume(claim):
                self._provision(claim)
        except ApiException as error:
            log.warning("claim %s/%s: %s", claim["metadata"]["namespace"], claim["metadata"]["name"], error.reason)

    def _provision(self, claim: dict) -> None:
        path = claim_folder(self.node_dir, claim["metadata"]["namespace"], claim["metadata"]["name"])
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, WORKER_UID, WORKER_UID)  # hostPath ignores fsGroup: the workers' uid and group own it
        path.chmod(0o2775)
        self.kube.create_pv(build_volume(claim, path))
        log.info(
            "provisioned %s for claim %s/%s at %s",
            volume_name(claim),
            claim["metadata"]["namespace"],
            claim["metadata"]["name"],
            path,
        )

    def _delete_volume(self, claim: dict) -> None:
        volume = self.kube.read_pv(volume_name(claim))
        if volume is None or volume["metadata"].get("annotations", {}).get(PROVISIONED_BY) != PROVISIONER_NAME:
            return
        self._delete(volume)

    def _delete_released_volumes(self) -> None:
        """Claims deleted while the agent was down leave their volumes Released."""
        for volume in self.kube.list_pvs():
            ours = volume["metadata"].get("annotations", {}).get(PROVISIONED_BY) == PROVISIONER_NAME
            if ours and (volume.get("status") or {}).get("phase") == "Released":
                self._delete(volume)

    def _delete(self, volume: dict) -> None:
        self.kube.delete_pv(volume["metadata"]["name"])
        path = Path(volume["spec"]["hostPath"]["path"])
        if path.is_relative_to(self.node_dir):  # never remove data outside the node's folder
            shutil.rmtree(path, ignore_errors=True)
        log.info("deleted %s and %s", volume["metadata"]["name"], path)
