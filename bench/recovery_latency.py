"""Benchmark: a training process killed -> the gang training again past its checkpoint, per restart strategy.

    flock /tmp/finetune-cluster.lock .venv/bin/python bench/recovery_latency.py            # 5 kills per strategy
    flock /tmp/finetune-cluster.lock .venv/bin/python bench/recovery_latency.py --kills 5 --record

The embedded cluster with its real node (kubelet over containerd, the project's images), `finetune operator`
as a process, the tiny model made offline and a claim for the output, as tests/e2e set them up. Each kill is
one fresh 2-worker job of the tiny model (a checkpoint every 4 steps, every step logged, no backoff),
Recreate and InPlace alternating: once its first checkpoint is complete, worker 1's training process gets
SIGKILL (under InPlace the one the pod's elastic agent started; under Recreate the container's trainer). The clock
runs from the kill until rank 0's progress.json, polled every 50 ms on the claim, comes from the restarted
gang (its attempt or its count of in-place restarts moved on: a report's time has whole seconds only) and
shows a step past the newest checkpoint at the kill. Also shown: whether the gang's pods are the same ones.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import common

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.e2e: the tiny assets, the job spec and how a worker's process is found

from finetune_dev.cluster.disk import check_free_space  # noqa: E402
from finetune_dev.cluster.node import Node  # noqa: E402
from finetune_dev.harness import Jobs, OperatorProcess, wait_for  # noqa: E402
from finetune_dev.images import ensure_images  # noqa: E402
from finetune_trainer.contract import PROGRESS_FILE, ProgressReport, RestartStrategy  # noqa: E402
from tests.conftest import Kube  # noqa: E402
from tests.e2e.conftest import create_runs_claim  # noqa: E402
from tests.e2e.test_training import running_pod, trainer_process, training_process  # noqa: E402
from tests.e2e.tiny_jobs import GRACE_SECONDS, checkpoint_steps, cluster_spec, make_assets, manifest  # noqa: E402

SECTION = "Recovery latency on the real node"
STRATEGIES = (RestartStrategy.RECREATE, RestartStrategy.IN_PLACE)
CHECKPOINT_INTERVAL = 4
MAX_STEPS = 1000  # far more than a kill and its recovery take: each job is deleted once measured
POLL_SECONDS = 0.05
RUN_SECONDS = 240  # a job's first checkpoint, or its recovery, on 2 busy cores
GOAL_SECONDS = 5.0  # issue 25: InPlace's median, and at most half of Recreate's


@dataclass(frozen=True)
class Kill:
    strategy: str
    seconds: float  # kill -> rank 0 reports a step past the checkpoint, from the restarted gang
    pods_kept: bool  # the gang's pod uids after the recovery are those before the kill


def measure(kills: int) -> tuple[list[Kill], str]:
    """`kills` kills per strategy, alternating, on a fresh cluster with its real node; the results and the load."""
    with common.scratch_folder("recovery") as scratch, common.cluster(Path(scratch) / "cluster") as control_plane:
        folder = Path(scratch)
        node = control_plane.node()
        check_free_space(node.folder)
        try:
            node.start()
            trainer_image = ensure_images(str(node.containerd_address))["trainer"]
            assets = make_assets(folder / "assets")
            for path in [assets, *assets.rglob("*")]:  # the workers' non-root user reads them (hostPath)
                path.chmod(0o755 if path.is_dir() else 0o644)
            kube = Kube(str(control_plane.kubeconfig), control_plane, waits_for_token_secrets=False)
            env = {
                "FINETUNE_OPERATOR_TERMINATION_GRACE_PERIOD_SECONDS": str(GRACE_SECONDS),
                "FINETUNE_OPERATOR_TRAINER_IMAGE": trainer_image,
                "FINETUNE_OPERATOR_IMAGE_PULL_POLICY": "Never",
            }
            operator = OperatorProcess(str(control_plane.kubeconfig), folder / "operator.log", env)
            operator.start()
            try:
                namespace = common.create_namespace(common.client(control_plane), "recovery")
                runs = create_runs_claim(kube, namespace, node)
                jobs = Jobs(kube.api_client(), namespace)
                load = common.load_average()
                results = [
                    time_kill(jobs, node, runs, assets, strategy, number)
                    for number in range(1, kills + 1)
                    for strategy in STRATEGIES
                ]
                return results, load
            finally:
                operator.stop()
        finally:
            node.remove()


def time_kill(jobs: Jobs, node: Node, runs: Path, assets: Path, strategy: str, number: int) -> Kill:
    """Run one job, SIGKILL worker 1's training process after the first checkpoint, time the recovery."""
    name = f"{strategy.lower()}-{number}"
    policy = {"strategy": strategy, "maxRestarts": 10, "backoffSeconds": 0}
    spec = cluster_spec(
        assets,
        training={"maxSteps": MAX_STEPS, "logEverySteps": 1},
        checkpoint={"intervalSteps": CHECKPOINT_INTERVAL},
        restartPolicy=policy,
    )
    jobs.create(manifest(spec, name=name))
    output = runs / name
    wait_for(lambda: checkpoint_steps(output), RUN_SECONDS, interval=POLL_SECONDS, what=f"a checkpoint of {name}")
    find = training_process if strategy == RestartStrategy.IN_PLACE else trainer_process
    victim = find(node, running_pod(jobs, 1, name))
    pods_before = {pod.metadata.uid for pod in jobs.pods(name)}
    checkpoint, before = checkpoint_steps(output)[-1], _generation(_report(output))

    killed_at = time.monotonic()
    victim.send_signal(signal.SIGKILL)

    def training_again() -> float | None:
        report = _report(output)
        past = report and report.step > checkpoint and _generation(report) != before
        return time.monotonic() - killed_at if past else None

    seconds = wait_for(training_again, RUN_SECONDS, interval=POLL_SECONDS, what=f"{name} to train again")
    kill = Kill(strategy, seconds, pods_kept={pod.metadata.uid for pod in jobs.pods(name)} == pods_before)
    print(f"{name}: training again {seconds:.2f} s after the kill; pods kept: {kill.pods_kept}", flush=True)
    jobs.delete(name)
    wait_for(lambda: not jobs.pods(name), RUN_SECONDS, what=f"the pods of {name} to be gone")
    return kill


def _report(output: Path) -> ProgressReport | None:
    try:
        return ProgressReport.from_json((output / PROGRESS_FILE).read_bytes())
    except FileNotFoundError:
        return None


def _generation(report: ProgressReport | None) -> tuple[int | None, int]:
    """Which gang made a report: its attempt (Recreate makes a new one) and its in-place restarts so far."""
    return (report.attempt, len(report.in_place_restarts)) if report else (None, 0)


def table(kills: list[Kill], load: str) -> str:
    lines = [
        "| strategy | kills | **kill -> training again** (median / p95 / max) | each (s, in order) | pod uids |",
        "| --- | --- | --- | --- | --- |",
    ]
    medians = {}
    for strategy in STRATEGIES:
        seconds = [k.seconds for k in kills if k.strategy == strategy]
        kept = {k.pods_kept for k in kills if k.strategy == strategy}
        medians[strategy] = common.median(seconds)
        uids = "unchanged" if kept == {True} else "all new" if kept == {False} else "mixed"
        lines.append(
            f"| {strategy} | {len(seconds)} | **{medians[strategy]:.2f} s** / "
            f"{common.percentile(seconds, 0.95):.2f} s / {max(seconds):.2f} s "
            f"| {', '.join(f'{s:.2f}' for s in seconds)} | {uids} |"
        )
    in_place, recreate = medians[RestartStrategy.IN_PLACE], medians[RestartStrategy.RECREATE]
    met = in_place <= recreate / 2 and in_place <= GOAL_SECONDS
    lines += [
        "",
        f"InPlace / Recreate (medians): **{in_place / recreate:.2f}**; goal (InPlace median <= half of "
        f"Recreate's and <= {GOAL_SECONDS:.0f} s): **{'met' if met else 'MISSED'}**. Load when the kills began: "
        f"{load}.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=5, help="kills per strategy (each its own job)")
    parser.add_argument("--record", action="store_true", help=f"write the '{SECTION}' section of RESULTS.md")
    args = parser.parse_args()
    date, load = common.utc_now(), common.load_average()
    kills, measured_load = measure(args.kills)
    print(table(kills, measured_load))
    if args.record:
        body = (
            common.recorded_header(date, load, "recovery_latency.py")
            + f"One 2-worker job of the tiny model per kill (CPU, fp32, a checkpoint every {CHECKPOINT_INTERVAL} "
            "steps, every step logged, `backoffSeconds: 0`), Recreate and InPlace alternating, on the embedded "
            "cluster's real node with the operator as a process. Once the job's first checkpoint is complete, "
            "worker 1's training process gets SIGKILL (InPlace: the one the pod's elastic agent started; "
            "Recreate: the container's trainer). Clock: from the kill until rank 0's progress.json on the claim "
            "(polled every 50 ms) comes from the restarted gang and shows a step past that checkpoint. Pod uids: "
            "the gang's pods after the recovery against those before the kill.\n\n" + table(kills, measured_load)
        )
        common.record_section(SECTION, body)


if __name__ == "__main__":
    main()
