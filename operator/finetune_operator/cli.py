"""The `finetune` command: crd, operator, train, local, cluster up/down."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

DEFAULT_CLUSTER_DIR = Path(".finetune-cluster")


def cmd_crd(_: argparse.Namespace) -> int:
    from finetune_operator.crd import crd_yaml

    sys.stdout.write(crd_yaml())
    return 0


def cmd_operator(_: argparse.Namespace) -> int:
    import kopf
    from pydantic import ValidationError

    from finetune_operator import (
        handlers,  # noqa: F401  (registers the handlers)
        metrics,
    )
    from finetune_operator.config import OperatorSettings, settings_error
    from finetune_operator.leader import LeaderElector, identity

    try:
        settings = OperatorSettings()
    except ValidationError as e:
        print(f"finetune operator: {settings_error(e)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    metrics.start_server(settings.metrics_port)  # a standby's too: Prometheus sees every replica up
    # /healthz from the start (a standby is alive too): red once passes or watches make no progress.
    with _serving_health(settings.health_port, metrics.LIVENESS.problems):
        elector = None
        if settings.leader_election_lease:
            elector = LeaderElector(
                settings.leader_election_namespace, settings.leader_election_lease, identity(), **_clock_skew()
            )
            elector.acquire()
            elector.keep_renewing()
        try:
            # Never kopf peering: a standby runs nothing at all, kopf's watches included, until it leads. On
            # SIGTERM kopf's clean-up (handlers.stop_queue) lets the work under way finish first.
            kopf.run(clusterwide=not settings.watch_namespaces, namespaces=settings.watch_namespaces, standalone=True)
        finally:
            if elector is not None:
                elector.release()  # a standby takes over now, not when the lease expires
    return 0


FAULT_CLOCK_SKEW = "FINETUNE_FAULT_INJECTION_CLOCK_SKEW_SECONDS"


def _clock_skew() -> dict[str, Any]:
    """Fault injection for the chaos tests, never set in production: this replica's wall clock read as off by
    that many seconds (the times it writes into the Lease), as a node with a drifting clock would."""
    skew = os.environ.get(FAULT_CLOCK_SKEW)
    if not skew:
        return {}
    logging.getLogger(__name__).warning("fault injection: the wall clock is read %s s off (%s)", skew, FAULT_CLOCK_SKEW)
    return {"wall_clock": lambda: datetime.now(timezone.utc) + timedelta(seconds=float(skew))}


@contextmanager
def _serving_health(port: int, problems: Callable[[], list[str]]) -> Iterator[None]:
    """/healthz: 200 while problems() has none, else 500 with them, one a line."""

    class Healthy(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/healthz":
                self.send_response(404)
                self.end_headers()
                return
            found = problems()
            self.send_response(500 if found else 200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(("\n".join(found) or "ok").encode() + b"\n")

        def log_message(self, *_: object) -> None:
            pass  # one line per probe is noise

    if not port:
        yield
        return
    server = ThreadingHTTPServer(("0.0.0.0", port), Healthy)
    threading.Thread(target=server.serve_forever, name="standby-health", daemon=True).start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


def cmd_train(args: argparse.Namespace) -> int:
    from finetune_trainer.entrypoint import run

    return run(args.config)


def cmd_local(args: argparse.Namespace) -> int:
    from finetune_operator.local import run_local

    return run_local(Path(args.job), Path(args.output_dir), max_restarts=args.max_restarts)


DEV_TOOLS_MISSING = (
    "error: `finetune cluster` is a development tool of the finetune-dev distribution: "
    "run `make setup` in a checkout (or `pip install -e dev/`)"
)


def _cluster_module():
    """The embedded cluster lives in the dev-only distribution, which no image installs."""
    try:
        from finetune_dev import cluster
    except ImportError:
        return None
    return cluster


def cmd_cluster_up(args: argparse.Namespace) -> int:
    cluster = _cluster_module()
    if cluster is None:
        print(DEV_TOOLS_MISSING, file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)  # the first build talks
    try:
        cluster.cluster_up(Path(args.dir).resolve(), with_node=not args.no_node)
    except cluster.ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n".join(cluster.export_lines(Path(args.dir).resolve())))
    return 0


def cmd_cluster_down(args: argparse.Namespace) -> int:
    cluster = _cluster_module()
    if cluster is None:
        print(DEV_TOOLS_MISSING, file=sys.stderr)
        return 1
    try:
        cluster.cluster_down(Path(args.dir).resolve(), keep=args.keep)
    except cluster.ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune", description="Kubernetes-native LoRA fine-tuning.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    crd = commands.add_parser("crd", help="print the FineTuneJob CRD generated from the API models")
    crd.set_defaults(run=cmd_crd)

    operator = commands.add_parser("operator", help="run the operator against the current kubeconfig")
    operator.set_defaults(run=cmd_operator)

    train = commands.add_parser("train", help="the trainer entrypoint inside worker pods")
    train.add_argument("--config", required=True, help="trainer config file (YAML or JSON)")
    train.set_defaults(run=cmd_train)

    local = commands.add_parser("local", help="run a FineTuneJob here as local processes")
    local.add_argument("job", help="FineTuneJob YAML")
    local.add_argument("--output-dir", default="out", help="where checkpoints, adapter/ and metrics.json go")
    local.add_argument("--max-restarts", type=int, default=None, help="override spec.restartPolicy.maxRestarts")
    local.set_defaults(run=cmd_local)

    cluster = commands.add_parser("cluster", help="the embedded Kubernetes control plane for tests and demos")
    cluster_commands = cluster.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")
    up = cluster_commands.add_parser(
        "up", help="start it (building it and the images the first time); print KUBECONFIG and the images' line"
    )
    up.add_argument("--dir", default=str(DEFAULT_CLUSTER_DIR), help="state folder")
    up.add_argument("--no-node", action="store_true", help="start no local node: pods stay Pending")
    up.set_defaults(run=cmd_cluster_up)
    down = cluster_commands.add_parser("down", help="stop it and delete what it made in its folder")
    down.add_argument("--dir", default=str(DEFAULT_CLUSTER_DIR), help="state folder")
    down.add_argument("--keep", action="store_true", help="keep the folder (logs, etcd) to debug")
    down.set_defaults(run=cmd_cluster_down)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.run(args))
