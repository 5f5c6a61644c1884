"""Benchmark: many FineTuneJobs applied at once; time until every worker pod exists, and the operator's RSS.

    .venv/bin/python bench/operator_scale.py                         # 100 x 4, then 500 x 8
    .venv/bin/python bench/operator_scale.py --jobs 100 --workers 4  # one scenario
    .venv/bin/python bench/operator_scale.py --repeat 3 --record     # and update bench/RESULTS.md
    .venv/bin/python bench/operator_scale.py --jobs 100 --operator-from /work/main --operator-from .  # A/B

Each scenario gets a fresh embedded control plane with no node (pods stay Pending, as on a cordoned
node) and a fresh operator process, made ready by a one-worker warm-up job. Then:

1. API server baseline: the same number of pods, created by this benchmark from one client
   (16 threads, responses not parsed), in a namespace deleted again before the operator's run;
2. the operator: the FineTuneJobs are created at once from a 16-thread pool; the clock runs from the
   first create until a pod watch has seen every worker pod. Peak RSS is the operator process's VmHWM
   (exact, kept by the kernel), read once the operator has gone quiet (its CPU time stopped growing).

The floor varies 2x from run to run with the machine's load, so the figure that counts is the ratio of
the two, measured in the same cluster minutes apart; with --repeat the summary gives the median ratio and
CPU per job over the runs, which interleave the scenarios (and the checkouts of --operator-from).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import common
import kubernetes

SECTION = "Operator scale"
SCENARIOS = [(100, 4, 5.0, 200.0), (500, 8, 20.0, 300.0)]  # jobs, workers, goal seconds, goal MB
GOAL_RATIO = 3.0  # all pods exist within 3x the API server's own floor
GOAL_CPU_MS_PER_JOB = 25.0  # half of the ~50 ms per job measured before (issue 14)
QUIET_SECONDS = 2.0  # the operator is quiet once it used under 2% CPU for this long

BASELINE_POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"labels": {"bench": "baseline"}},
    "spec": {
        "restartPolicy": "Never",
        "containers": [
            {
                "name": "trainer",
                "image": "ghcr.io/finetune-operator/trainer:0.1.0",
                "command": ["finetune", "train", "--config", "/etc/finetune/config.yaml"],
                "resources": {"limits": {"nvidia.com/gpu": "1"}},
            }
        ],
    },
}


@dataclass
class Run:
    jobs: int
    workers: int
    controller_manager_qps: int | None  # None: the embedded cluster's default (client-go's 20)
    service_account: str | None  # spec.template.serviceAccountName of every job (None: a per-job account)
    baseline_seconds: float
    seconds: float
    creates_seconds: float  # until the last FineTuneJob create returned
    half_seconds: float  # until half the pods existed
    rss_ready_mb: float  # after the warm-up job, before the burst
    peak_rss_mb: float
    operator_cpu_seconds: float
    reconciles: int
    reconcile_errors: int
    settle_seconds: float | None  # from the first create until the operator went quiet (None: not in 300 s)
    load_before: str
    load_after: str
    operator_from: str = ""  # the checkout whose operator ran ('' for this one)

    @property
    def ratio(self) -> float:
        return self.seconds / self.baseline_seconds

    @property
    def cpu_ms_per_job(self) -> float:
        return 1000 * self.operator_cpu_seconds / self.jobs


def api_server_baseline(api_client: kubernetes.client.ApiClient, count: int) -> float:
    """Seconds for this client to create `count` pods (16 threads) until a watch has seen them all."""
    namespace = common.create_namespace(api_client, "baseline")
    core = kubernetes.client.CoreV1Api(api_client)

    def create(index: int) -> None:
        pod = copy.deepcopy(BASELINE_POD)
        pod["metadata"]["name"] = f"pod-{index:05d}"
        core.create_namespaced_pod(namespace, pod, _preload_content=False).read()

    with common.watch_pods(api_client, namespace, label_selector="bench=baseline") as pods:
        started = time.monotonic()
        with ThreadPoolExecutor(common.CLIENT_THREADS) as pool:
            list(pool.map(create, range(count)))
        if not pods.wait(lambda seen: len(seen.live()) >= count, timeout=300):
            raise RuntimeError(f"baseline: {len(pods.live())} of {count} pods after 300 s")
        seconds = max(p.added for p in pods.live()) - started
    core.delete_namespace(namespace)
    _wait_gone(core, namespace)  # its pods' deletion must not overlap the operator's run
    return seconds


def _wait_gone(core: kubernetes.client.CoreV1Api, namespace: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            core.read_namespace(namespace)
        except kubernetes.client.ApiException as e:
            if e.status == 404:
                return
            raise
        time.sleep(0.5)
    raise RuntimeError(f"namespace {namespace} still there after {timeout} s")


def wait_quiet(pid: int, timeout: float = 300) -> float | None:
    """Block until the process has used < 2% of a core for QUIET_SECONDS; when it went quiet (None: never)."""
    deadline = time.monotonic() + timeout
    last_cpu, last_busy = common.cpu_seconds(pid), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        cpu = common.cpu_seconds(pid)
        if cpu - last_cpu > 0.02 * 0.25:
            last_busy = time.monotonic()
        last_cpu = cpu
        if time.monotonic() - last_busy >= QUIET_SECONDS:
            return last_busy
    return None


def run_scenario(
    jobs: int,
    workers: int,
    controller_manager_qps: int | None,
    service_account: str | None,
    operator_from: str = "",
) -> Run:
    flags = []
    if controller_manager_qps:
        flags = [f"--kube-api-qps={controller_manager_qps}", f"--kube-api-burst={2 * controller_manager_qps}"]
    with (
        common.scratch_folder("scale") as folder,
        common.cluster(Path(folder) / "cluster", controller_manager_flags=flags) as control_plane,
    ):
        api_client = common.client(control_plane)
        baseline = api_server_baseline(api_client, jobs * workers)
        with common.operator(control_plane, Path(folder), _operator_env(operator_from)) as operator:
            pid = operator.process.pid
            rss_ready = common.rss_mb(pid)
            cpu_before = common.cpu_seconds(pid)
            metrics_before = common.operator_metrics(operator)
            namespace = common.create_namespace(api_client, "scale")
            load_before = common.load_average()
            client_jobs = common.Jobs(api_client, namespace)
            template = {"template": {"serviceAccountName": service_account}} if service_account else {}
            manifests = [common.job_manifest(f"job-{i:04d}", workers=workers, **template) for i in range(jobs)]
            with common.watch_pods(api_client, namespace) as pods:
                started = time.monotonic()
                with ThreadPoolExecutor(common.CLIENT_THREADS) as pool:
                    list(pool.map(client_jobs.create, manifests))
                creates_done = time.monotonic()
                expected = jobs * workers
                if not pods.wait(lambda seen: len(seen.live()) >= expected, timeout=600):
                    raise RuntimeError(f"{len(pods.live())} of {expected} pods after 600 s; see {operator.log_path}")
                times = sorted(p.added - started for p in pods.live())
            quiet_at = wait_quiet(pid)
            metrics_after = common.operator_metrics(operator)
            return Run(
                jobs=jobs,
                workers=workers,
                controller_manager_qps=controller_manager_qps,
                service_account=service_account,
                baseline_seconds=baseline,
                seconds=times[-1],
                creates_seconds=creates_done - started,
                half_seconds=times[len(times) // 2],
                rss_ready_mb=rss_ready,
                peak_rss_mb=common.peak_rss_mb(pid),
                operator_cpu_seconds=common.cpu_seconds(pid) - cpu_before,
                reconciles=int(_delta(metrics_before, metrics_after, "finetune_reconcile_duration_seconds_count")),
                reconcile_errors=int(_delta(metrics_before, metrics_after, "finetune_reconcile_errors_total")),
                settle_seconds=quiet_at - started if quiet_at else None,
                load_before=load_before,
                load_after=common.load_average(),
                operator_from=operator_from,
            )


def _operator_env(checkout: str) -> dict[str, str] | None:
    """The operator process runs the code of another checkout (its operator/ and trainer/ packages)."""
    if not checkout:
        return None
    root = Path(checkout).resolve()
    return {"PYTHONPATH": f"{root / 'operator'}:{root / 'trainer'}:{root / 'dev'}"}


def _revision(checkout: str) -> str:
    if not checkout:
        return "this checkout"
    command = ["git", "-C", checkout, "describe", "--always", "--dirty"]
    return subprocess.run(command, capture_output=True, text=True).stdout.strip() or checkout


def _delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def goal_text(value: float, goal: float, unit: str) -> str:
    return f"{'met' if value <= goal else 'MISSED'} (<= {goal:g} {unit})"


def variant_text(run: Run) -> str:
    parts = [f"operator of {_revision(run.operator_from)}"] if run.operator_from else []
    parts += [f"controller-manager QPS {run.controller_manager_qps}"] if run.controller_manager_qps else []
    parts += [f"jobs name ServiceAccount `{run.service_account}`"] if run.service_account else []
    return ", ".join(parts) or "as shipped"


def table(runs: list[Run]) -> str:
    goals = {(j, w): (s, m) for j, w, s, m in SCENARIOS}
    lines = [
        "| jobs x workers | variant | API server baseline | **all pods exist** | **/ baseline** | half the pods "
        "| last job created | **peak RSS** (when ready) | operator CPU (**per job**) | reconciles (errors) "
        "| quiet after | load before -> after |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        goal_s, goal_mb = goals.get((run.jobs, run.workers), (None, None))
        seconds = f"**{run.seconds:.1f} s**" + (f" {goal_text(run.seconds, goal_s, 's')}" if goal_s else "")
        settled = f"{run.settle_seconds:.0f} s" if run.settle_seconds is not None else "not in 300 s"
        rss = f"**{run.peak_rss_mb:.0f} MB**" + (f" {goal_text(run.peak_rss_mb, goal_mb, 'MB')}" if goal_mb else "")
        lines.append(
            f"| {run.jobs} x {run.workers} | {variant_text(run)} | {run.baseline_seconds:.2f} s | {seconds} | "
            f"**{run.ratio:.1f}x** | {run.half_seconds:.1f} s | {run.creates_seconds:.1f} s | {rss} "
            f"({run.rss_ready_mb:.0f} MB) | {run.operator_cpu_seconds:.1f} s (**{run.cpu_ms_per_job:.0f} ms**) "
            f"| {run.reconciles} ({run.reconcile_errors}) | {settled} "
            f"| {run.load_before} -> {run.load_after} |"
        )
    return "\n".join(lines)


def summary(runs: list[Run]) -> str:
    """Per scenario and variant: the medians over its runs, against the goals."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault((run.jobs, run.workers, variant_text(run)), []).append(run)
    goals = {(j, w): m for j, w, _, m in SCENARIOS}
    lines = [
        "| jobs x workers | variant | runs | **all pods / baseline** (median; each) | **CPU per job** (median) "
        "| **peak RSS** (max) | reconciles per job (median) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (jobs, workers, variant), group in groups.items():
        ratio = statistics.median(r.ratio for r in group)
        cpu = statistics.median(r.cpu_ms_per_job for r in group)
        rss = max(r.peak_rss_mb for r in group)
        goal_mb = goals.get((jobs, workers))
        each = ", ".join(f"{r.ratio:.1f}" for r in group)
        lines.append(
            f"| {jobs} x {workers} | {variant} | {len(group)} | **{ratio:.1f}x** {goal_text(ratio, GOAL_RATIO, 'x')}; "
            f"{each} | **{cpu:.0f} ms** {goal_text(cpu, GOAL_CPU_MS_PER_JOB, 'ms')} | **{rss:.0f} MB**"
            + (f" {goal_text(rss, goal_mb, 'MB')}" if goal_mb else "")
            + f" | {statistics.median(r.reconciles / r.jobs for r in group):.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, help="FineTuneJobs applied at once (default: both scenarios)")
    parser.add_argument("--workers", type=int, default=4, help="workers per job (with --jobs)")
    parser.add_argument("--repeat", type=int, default=1, help="run each scenario this many times")
    parser.add_argument(
        "--controller-manager-qps",
        type=int,
        action="append",
        default=None,
        metavar="QPS",
        help="also run on a cluster whose controller-manager may send QPS requests/s "
        "(burst 2 x QPS); 0 is the stock cluster; repeatable (default: 0)",
    )
    parser.add_argument(
        "--service-account",
        action="append",
        default=None,
        metavar="NAME",
        help="also run with spec.template.serviceAccountName: NAME on every job (no per-job "
        "account: no wait for its token Secret); '' is the per-job account; repeatable",
    )
    parser.add_argument(
        "--operator-from",
        action="append",
        default=None,
        metavar="CHECKOUT",
        help="run the operator code of this checkout (its operator/ and trainer/); repeatable, the runs "
        "interleave; '' or . is this one (default)",
    )
    parser.add_argument("--record", action="store_true", help=f"replace the '{SECTION}' section of RESULTS.md")
    args = parser.parse_args()
    scenarios = [(args.jobs, args.workers)] if args.jobs else [(j, w) for j, w, _, _ in SCENARIOS]
    clusters = args.controller_manager_qps or [0]
    accounts = args.service_account or [""]
    here = Path(__file__).resolve().parent.parent
    checkouts = ["" if not c or Path(c).resolve() == here else c for c in args.operator_from or [""]]
    date, load = common.utc_now(), common.load_average()
    runs = []
    for _ in range(args.repeat):
        for jobs, workers in scenarios:
            for qps in clusters:
                for account in accounts:
                    for checkout in checkouts:
                        print(
                            f"{jobs} x {workers}, controller-manager QPS {qps or 'default'}, ServiceAccount "
                            f"{account or 'per job'}, operator of {_revision(checkout)}: running "
                            f"(load {common.load_average()})",
                            flush=True,
                        )
                        runs.append(run_scenario(jobs, workers, qps or None, account or None, checkout))
                        print(table(runs[-1:]), flush=True)
    print(table(runs))
    print()
    print(summary(runs))
    if args.record:
        body = (
            common.recorded_header(date, load, "operator_scale.py")
            + "Embedded control plane (etcd + kube-apiserver v1.20.2 + controller-manager + scheduler on loopback), "
            "no node (pods stay Pending); a fresh cluster and operator for every row. Clock: first FineTuneJob "
            "create -> a pod watch has seen every worker pod. Baseline: as many plain pods created by one client "
            "(16 threads). Peak RSS: the operator process's VmHWM once it went quiet; in brackets its RSS when "
            "ready (after a one-worker warm-up job). Operator CPU: its CPU time from just before the first create "
            "until it went quiet, divided by the jobs.\n\n" + summary(runs) + "\n\nEach run:\n\n" + table(runs)
        )
        common.record_section(SECTION, body)


if __name__ == "__main__":
    main()
