"""Benchmark: the API requests the operator makes for one FineTuneJob, from create to Succeeded.

    .venv/bin/python bench/api_requests.py            # a 2-worker job
    .venv/bin/python bench/api_requests.py --workers 4 --record

The embedded control plane runs with an audit log (every request, Metadata level); the operator's
requests are those with its User-Agents (kopf's client at start-up; the kubernetes client's watches, reads,
writes and Events); the benchmark's own carry `finetune-bench`. After the operator is up (its start-up requests are
counted apart), one job is created; the benchmark plays the kubelet: both workers Running and Ready,
then both Succeeded. Two idle windows, while the job runs and after it succeeded, must see no request
at all: the operator is driven by watch events, not by polling.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import common

SECTION = "API requests per job lifecycle"
JOB = "lifecycle"
OPERATOR_AGENTS = ("kopf", "OpenAPI-Generator")  # kopf's aiohttp client, the kubernetes client's default


@dataclass
class Lifecycle:
    workers: int
    startup: list[common.Request]  # the operator's before the job, but for the warm-up job's
    job: list[common.Request]  # the operator's, from the job's create until after the idle window
    idle_running: list[common.Request]  # the operator's while the job ran and nothing changed
    idle_finished: list[common.Request]  # the operator's after the job succeeded
    idle_seconds: float
    others: Counter  # requests of the other components in the job's window, by component


def measure(workers: int, idle_seconds: float) -> Lifecycle:
    with common.scratch_folder("requests") as folder:
        audit_folder = Path(folder) / "audit"
        audit = common.audit_flags(audit_folder)
        with common.cluster(Path(folder) / "cluster", apiserver_flags=audit) as control_plane:
            api_client = common.client(control_plane)
            operator_started = time.time()
            with common.operator(control_plane, Path(folder)):
                namespace = common.create_namespace(api_client, "lifecycle")
                jobs = common.Jobs(api_client, namespace)
                with (
                    common.watch_pods(api_client, namespace) as pods,
                    common.watch_jobs(api_client, namespace) as watched,
                ):
                    created = time.time()
                    jobs.create(common.job_manifest(JOB, workers=workers))
                    gang = pods.wait(lambda w: len(w.live()) == workers and w.live(), timeout=60)
                    if not gang:
                        raise RuntimeError(f"no gang of {workers} pods within 60 s")
                    for pod in gang:
                        jobs.run_pod(pod.name)
                    _wait_phase(watched, "Running")
                    idle_running = _idle(idle_seconds)
                    for pod in gang:
                        jobs.finish_pod(pod.name, exit_code=0, reason="Completed")
                    _wait_phase(watched, "Succeeded")
                    idle_finished = _idle(idle_seconds)
            time.sleep(1)  # the audit log is written as requests complete: let the last lines land
            requests = common.read_audit(audit_folder / "audit.log")
    mine = [r for r in requests if r.component in OPERATOR_AGENTS]
    warmup_namespace = next(
        r.namespace for r in requests if r.component == common.BENCH_USER_AGENT and r.name == "warmup"
    )
    window = [r for r in requests if created <= r.time <= idle_finished[1]]
    return Lifecycle(
        workers=workers,
        startup=[r for r in mine if operator_started <= r.time < created and r.namespace != warmup_namespace],
        # the warm-up job's Events and companion objects may still go out after the job's create
        job=[r for r in mine if created <= r.time <= idle_finished[1] and r.namespace != warmup_namespace],
        idle_running=[r for r in mine if idle_running[0] <= r.time <= idle_running[1]],
        idle_finished=[r for r in mine if idle_finished[0] <= r.time <= idle_finished[1]],
        idle_seconds=idle_seconds,
        others=Counter(r.component for r in window if r.component not in OPERATOR_AGENTS),
    )


def _wait_phase(watched: common.Watch, phase: str) -> None:
    def reached(w: common.Watch) -> bool:
        job = w.named(JOB)
        return bool(job) and (job.body.get("status") or {}).get("phase") == phase

    if not watched.wait(reached, timeout=60):
        raise RuntimeError(f"{JOB} not {phase} within 60 s")


def _idle(seconds: float) -> tuple[float, float]:
    """Let the cluster be for `seconds` after a short settling time; the window's (start, end)."""
    time.sleep(1.0)  # the operator's own reaction to the last change (its status write, an Event)
    start = time.time()
    time.sleep(seconds)
    return start, time.time()


def breakdown(requests: list[common.Request]) -> list[tuple[str, int]]:
    counts = Counter(_label(r) for r in requests)
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def _label(request: common.Request) -> str:
    if request.resource.startswith("/api"):  # no objectRef: API discovery (/api, /apis/<group>/<version>)
        return f"{request.verb} discovery (/api, /apis/...) -> {request.code}"
    return f"{request.verb} {request.resource} -> {request.code}"


def sequence(requests: list[common.Request]) -> str:
    """The requests in order, runs of the same request folded: `get finetunejobs x3, patch ...`."""
    runs: list[list] = []
    for request in requests:
        failed = request.code is not None and request.code >= 400
        label = f"{request.verb} {request.resource}" + (f" ({request.code})" if failed else "")
        if runs and runs[-1][0] == label:
            runs[-1][1] += 1
        else:
            runs.append([label, 1])
    return ", ".join(label + (f" x{count}" if count > 1 else "") for label, count in runs)


def report(results: list[Lifecycle]) -> str:
    """Totals and a per-run breakdown by verb, resource and response code; each run's sequence."""
    workers, idle_seconds = results[0].workers, results[0].idle_seconds
    idle = [len(r.idle_running) + len(r.idle_finished) for r in results]
    totals = " and ".join(str(len(r.job)) for r in results)
    counts = [dict(breakdown(r.job)) for r in results]
    labels = sorted(
        {label for count in counts for label in count},
        key=lambda label: (-max(count.get(label, 0) for count in counts), label),
    )
    runs = " | ".join(f"run {n}" for n in range(1, len(results) + 1))
    lines = [
        f"**{totals} requests** (run{'s' if len(results) > 1 else ''}) for one {workers}-worker job, create -> "
        f"Succeeded; {' and '.join(map(str, idle))} during the two {idle_seconds:.0f}-second idle windows (job "
        f"Running, job Succeeded): {'no polling' if not any(idle) else 'POLLING: see below'}.",
        "",
        f"| verb resource -> code | {runs} |",
        "| --- |" + " --- |" * len(results),
        *[f"| {label} | " + " | ".join(str(count.get(label, 0)) for count in counts) + " |" for label in labels],
        "",
    ]
    for number, result in enumerate(results, 1):
        lines += [f"In order (run {number}): {sequence(result.job)}.", ""]
    startup = results[-1].startup
    lines += [
        f"Operator start-up (once, not per job): {len(startup)} requests: "
        + ", ".join(f"{label} x{count}" for label, count in breakdown(startup))
        + ".",
        "",
        "Other components in the same window (last run): "
        + ", ".join(f"{name} {count}" for name, count in results[-1].others.most_common())
        + ".",
    ]
    for number, result in enumerate(results, 1):
        if result.idle_running or result.idle_finished:
            lines += [
                "",
                f"Requests in the idle windows (run {number}): "
                + sequence(result.idle_running + result.idle_finished)
                + ".",
            ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="workers of the job")
    parser.add_argument("--idle-seconds", type=float, default=10.0, help="length of each idle window")
    parser.add_argument("--repeat", type=int, default=1, help="runs, each on a fresh cluster")
    parser.add_argument("--record", action="store_true", help=f"replace the '{SECTION}' section of RESULTS.md")
    args = parser.parse_args()
    date, load = common.utc_now(), common.load_average()
    results = [measure(args.workers, args.idle_seconds) for _ in range(args.repeat)]
    text = report(results)
    print(text)
    if args.record:
        body = (
            common.recorded_header(date, load, "api_requests.py")
            + "Counted from the API server's audit log (every request at Metadata level), keeping the operator's "
            "User-Agents (kopf's client, at start-up only; the kubernetes client: watches, reads, writes and "
            "Events). The "
            "benchmark plays the kubelet; the operator's watches were opened at start-up and stay open, so "
            "per job only one-shot requests appear. The warm-up job's own (its Events and companion objects go out "
            "in the background, possibly after the job's create) are left out.\n\n" + text
        )
        common.record_section(SECTION, body)


if __name__ == "__main__":
    main()
