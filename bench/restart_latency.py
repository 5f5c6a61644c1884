"""Benchmark: a worker's failure seen -> the next attempt's gang created (backoffSeconds: 0).

    .venv/bin/python bench/restart_latency.py                        # 20 restarts of a 2-worker job
    .venv/bin/python bench/restart_latency.py --restarts 20 --workers 4 --record

One FineTuneJob on a fresh embedded control plane with no node; the benchmark plays the kubelet. For
every attempt it waits (on a pod watch) for the gang, reports every worker Running and Ready, waits
(on a job watch) for phase Running, then reports worker 0 as Failed with exit code 1. The clock runs
from just before that pod-status write ("the failure seen": the moment a kubelet would report it) until
the pod watch has seen every pod of the next attempt. Also shown: until the failed gang was deleted, and
until the first pod of the next gang existed.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import common

SECTION = "Restart latency"
GOAL_SECONDS = 2.0
JOB = "restarts"


@dataclass
class Restart:
    gang_deleted: float  # failure written -> every pod of the failed attempt deleted
    first_pod: float  # -> the first pod of the next attempt exists
    gang_created: float  # -> every pod of the next attempt exists


def measure(restarts: int, workers: int) -> tuple[list[Restart], str]:
    """Time `restarts` gang restarts of one job on a fresh cluster; the results and the load average."""
    with common.scratch_folder("restart") as folder, common.cluster(Path(folder) / "cluster") as control_plane:
        api_client = common.client(control_plane)
        with common.operator(control_plane, Path(folder)):
            namespace = common.create_namespace(api_client, "restart")
            jobs = common.Jobs(api_client, namespace)
            load = common.load_average()
            policy = {"maxRestarts": restarts + 1, "backoffSeconds": 0}
            with common.watch_pods(api_client, namespace) as pods, common.watch_jobs(api_client, namespace) as job:
                jobs.create(common.job_manifest(JOB, workers=workers, restartPolicy=policy))
                results = [time_restart(jobs, pods, job, attempt, workers) for attempt in range(restarts)]
            return results, load


def time_restart(jobs: common.Jobs, pods: common.Watch, job: common.Watch, attempt: int, workers: int) -> Restart:
    """Run the gang of `attempt`, fail its worker 0, and time the gang of attempt + 1."""
    gang = _wait_gang(pods, attempt, workers)
    for pod in gang:
        jobs.run_pod(pod.name)
    if not job.wait(lambda w: _phase(w) == "Running", timeout=60):
        raise RuntimeError(f"{JOB} not Running after its gang ran (attempt {attempt})")
    failed_at = time.monotonic()
    jobs.finish_pod(f"{JOB}-worker-0", exit_code=1, reason="Error", message="bench: worker failed")
    next_gang = _wait_gang(pods, attempt + 1, workers)
    if not pods.wait(lambda w: all(p.deleted for p in gang), timeout=60):  # seen before the next gang, as a rule
        raise RuntimeError(f"the failed gang of attempt {attempt} was not deleted within 60 s")
    restart = Restart(
        gang_deleted=max(p.deleted for p in gang) - failed_at,
        first_pod=min(p.added for p in next_gang) - failed_at,
        gang_created=max(p.added for p in next_gang) - failed_at,
    )
    print(f"restart {attempt + 1}: next gang created {_ms(restart.gang_created)} after the failure", flush=True)
    return restart


def _wait_gang(pods: common.Watch, attempt: int, workers: int) -> list[common.Seen]:
    def gang(w: common.Watch) -> list[common.Seen] | None:
        members = w.live(**{common.LABEL_ATTEMPT: str(attempt)})
        return members if len(members) == workers else None

    found = pods.wait(gang, timeout=60)
    if not found:
        raise RuntimeError(f"no gang of {workers} pods for attempt {attempt} within 60 s")
    return found


def _phase(watched: common.Watch) -> str | None:
    job = watched.named(JOB)
    return ((job.body.get("status") or {}).get("phase")) if job else None


def table(runs: list[tuple[list[Restart], str]], workers: int) -> str:
    lines = [
        "| run | restarts | workers | failure -> gang deleted (median / p95) | -> first new pod (median / p95) "
        "| **-> whole new gang** (median / p95 / max) | goal < 2 s (p95) | load (1, 5, 15 min) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for number, (results, load) in enumerate(runs, 1):
        deleted = [r.gang_deleted for r in results]
        first = [r.first_pod for r in results]
        created = [r.gang_created for r in results]
        p95 = common.percentile(created, 0.95)
        lines.append(
            f"| {number} | {len(results)} | {workers} | {_median_p95(deleted)} | {_median_p95(first)} "
            f"| **{_ms(common.median(created))} / {_ms(p95)}** / {_ms(max(created))} "
            f"| {'met' if p95 < GOAL_SECONDS else 'MISSED'} | {load} |"
        )
    return "\n".join(lines)


def _median_p95(seconds: list[float]) -> str:
    return f"{_ms(common.median(seconds))} / {_ms(common.percentile(seconds, 0.95))}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--restarts", type=int, default=20, help="gang restarts to time")
    parser.add_argument("--workers", type=int, default=2, help="workers of the job")
    parser.add_argument("--repeat", type=int, default=1, help="runs, each on a fresh cluster")
    parser.add_argument("--record", action="store_true", help=f"replace the '{SECTION}' section of RESULTS.md")
    args = parser.parse_args()
    date, load = common.utc_now(), common.load_average()
    runs = [measure(args.restarts, args.workers) for _ in range(args.repeat)]
    print(table(runs, args.workers))
    if args.record:
        body = (
            common.recorded_header(date, load, "restart_latency.py")
            + "One job, `restartPolicy: {backoffSeconds: 0}`, on the embedded control plane with no node; the "
            "benchmark plays the kubelet (gang Running, then worker 0 Failed with exit code 1). Clock: from "
            "just before that pod-status write to the pod watch seeing the new attempt's pods. Failed pods are "
            "not bound to a node here, so the API server deletes them at once; on a real node the deletion "
            "waits for the kubelet to stop the other workers (their grace period), which adds to this.\n\n"
            + table(runs, args.workers)
        )
        common.record_section(SECTION, body)


if __name__ == "__main__":
    main()
