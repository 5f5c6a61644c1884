"""Pod status as a kubelet reports it (phase, conditions, container statuses), computed from what the
local node knows about each container. Pure: no I/O, the clock passed in."""

from __future__ import annotations

from dataclasses import dataclass, field


def waiting(reason: str, message: str | None = None) -> dict:
    return {"waiting": {"reason": reason, **({"message": message} if message else {})}}


@dataclass
class ContainerRun:
    """One container of a pod as the node sees it; `state` and `last_state` are Kubernetes ContainerState dicts."""

    name: str
    image: str
    restart_count: int = 0
    state: dict = field(default_factory=lambda: waiting("ContainerCreating"))
    last_state: dict = field(default_factory=dict)

    @property
    def running(self) -> bool:
        return "running" in self.state

    @property
    def terminated(self) -> dict | None:
        return self.state.get("terminated")

    @property
    def succeeded(self) -> bool:
        return bool(self.terminated) and self.terminated["exitCode"] == 0


def pod_phase(restart_policy: str, init_runs: list[ContainerRun], runs: list[ContainerRun]) -> str:
    """Pending, Running, Succeeded or Failed, by the kubelet's rules (getPhase)."""
    if not all(run.succeeded for run in init_runs):
        failed_init = any(run.terminated and not run.succeeded for run in init_runs)
        return "Failed" if failed_init and restart_policy == "Never" else "Pending"
    running = stopped = succeeded = pending = 0
    for run in runs:
        terminated = run.terminated or ("waiting" in run.state and run.last_state.get("terminated"))
        if run.running:
            running += 1
        elif terminated:
            stopped += 1
            succeeded += terminated["exitCode"] == 0
        else:
            pending += 1
    if pending:
        return "Pending"
    if running:
        return "Running"
    if restart_policy == "Always":
        return "Running"
    if stopped == succeeded:
        return "Succeeded"
    return "Failed" if restart_policy == "Never" else "Running"


def container_status(run: ContainerRun, pod_uid: str) -> dict:
    status = {
        "name": run.name,
        "image": run.image,
        "imageID": "",
        "ready": run.running,
        "started": run.running,
        "restartCount": run.restart_count,
        "state": run.state,
        "lastState": run.last_state,
    }
    if "waiting" not in run.state:
        status["containerID"] = f"local://{pod_uid}/{run.name}/{run.restart_count}"
    return status


def pod_conditions(
    previous: list[dict], phase: str, init_runs: list[ContainerRun], runs: list[ContainerRun], now: str
) -> list[dict]:
    """PodScheduled (kept from the scheduler), Initialized, ContainersReady and Ready."""
    previous_by_type = {condition["type"]: condition for condition in previous}

    def condition(kind: str, ready: bool, reason: str | None, message: str | None) -> dict:
        status = "True" if ready else "False"
        before = previous_by_type.get(kind)
        since = before["lastTransitionTime"] if before and before.get("status") == status else now
        result = {"type": kind, "status": status, "lastProbeTime": None, "lastTransitionTime": since}
        if not ready:
            result.update(reason=reason, message=message)
        return result

    incomplete = [run.name for run in init_runs if not run.succeeded]
    unready = [run.name for run in runs if not run.running]
    not_ready_reason = "PodCompleted" if phase == "Succeeded" else "ContainersNotReady"
    not_ready_message = f"containers with unready status: [{' '.join(unready)}]"
    scheduled = previous_by_type.get("PodScheduled") or {
        "type": "PodScheduled",
        "status": "True",
        "lastProbeTime": None,
        "lastTransitionTime": now,
    }
    return [
        condition(
            "Initialized",
            not incomplete,
            "ContainersNotInitialized",
            f"containers with incomplete status: [{' '.join(incomplete)}]",
        ),
        condition("Ready", not unready, not_ready_reason, not_ready_message),
        condition("ContainersReady", not unready, not_ready_reason, not_ready_message),
        scheduled,
    ]


def pod_status(
    pod: dict,
    *,
    pod_ip: str,
    host_ip: str,
    start_time: str,
    init_runs: list[ContainerRun],
    runs: list[ContainerRun],
    now: str,
    failure: tuple[str, str] | None = None,
) -> dict:
    """The pod's whole status; `failure` (reason, message) fails the pod, e.g. DeadlineExceeded."""
    restart_policy = pod["spec"].get("restartPolicy", "Always")
    phase = "Failed" if failure else pod_phase(restart_policy, init_runs, runs)
    uid = pod["metadata"]["uid"]
    return {
        "phase": phase,
        "reason": failure[0] if failure else None,
        "message": failure[1] if failure else None,
        "conditions": pod_conditions((pod.get("status") or {}).get("conditions") or [], phase, init_runs, runs, now),
        "hostIP": host_ip,
        "podIP": pod_ip,
        "podIPs": [{"ip": pod_ip}],
        "startTime": start_time,
        "initContainerStatuses": [container_status(run, uid) for run in init_runs] or None,
        "containerStatuses": [container_status(run, uid) for run in runs],
    }
