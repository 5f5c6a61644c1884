"""checkov's Kubernetes policies on the rendered chart and on the worker pods the operator makes: only the
exceptions listed (with their reasons) in the chart's README fail.

checkov is not a project dependency (it pins much of its own): install it apart, e.g.
    python -m venv .venv-checkov && .venv-checkov/bin/pip install checkov
or point CHECKOV at a checkov executable. Without it the test is skipped, saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator.api import FineTuneJob
from finetune_operator.builders import build_gang, build_job_resources
from finetune_operator.config import OperatorSettings
from tests.helm.chart import CHART, REPO, render

# check id -> why it does not fit; the chart README's "checkov exceptions" table lists the same ids.
EXCEPTIONS = {
    "CKV_K8S_8": "liveness probes: a training worker runs to completion; a hung step is the trainer's to detect",
    "CKV_K8S_9": "readiness probes: workers serve no traffic; rendezvous waits for every rank by itself",
    "CKV_K8S_11": "CPU limits: throttling a DDP rank stalls the whole gang; requests reserve the cores",
    "CKV_K8S_15": "imagePullPolicy Always: the user's choice (trainer.image.pullPolicy, image.pullPolicy)",
    "CKV_K8S_43": "image digests: the user's choice (image.digest, trainer.image.digest, spec.image)",
    "CKV_K8S_35": "Secrets as env: a job's own spec.template.envFrom/env (HF_TOKEN); the operator reads none",
    "CKV_K8S_38": "the operator's ServiceAccount token: the operator talks to the API server",
}
WORKER_NAMESPACE = "ml"
SCANNED_JOBS = {
    "default-gpu": {
        "model": "org/base",
        "dataset": {"path": "/data/train.jsonl"},
        "workers": 2,
        "gpusPerWorker": 8,
        "storage": {"persistentVolumeClaim": {"claimName": "runs"}},
    },
    "llama-alpaca": yaml.safe_load((REPO / "examples" / "llama-alpaca-lora.yaml").read_text())["spec"],
}


def checkov_executable() -> str | None:
    for candidate in (os.environ.get("CHECKOV"), str(REPO / ".venv-checkov" / "bin" / "checkov")):
        if candidate and Path(candidate).is_file():
            return candidate
    return shutil.which("checkov")


def chart_settings(objects: list[dict[str, Any]]) -> OperatorSettings:
    """The operator's settings as the chart's Deployment gives them."""
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    prefix = "FINETUNE_OPERATOR_"
    fields = {var["name"][len(prefix) :].lower(): var["value"] for var in env if var["name"].startswith(prefix)}
    return OperatorSettings(**fields)


def operator_objects(settings: OperatorSettings) -> list[dict[str, Any]]:
    objects = []
    for name, spec in SCANNED_JOBS.items():
        metadata = {"name": name, "namespace": WORKER_NAMESPACE, "uid": f"uid-{name}"}
        job = FineTuneJob.model_validate({"metadata": metadata, "spec": spec})
        objects += build_job_resources(job) + build_gang(job, attempt=0, settings=settings)
    return objects


@pytest.fixture(scope="module")
def checkov_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    checkov = checkov_executable()
    if checkov is None:
        pytest.skip(
            "checkov is not installed: `python -m venv .venv-checkov && .venv-checkov/bin/pip install checkov`, "
            "or set CHECKOV to a checkov executable"
        )
    chart = render({"networkPolicy": {"enabled": True, "workerNamespaces": [WORKER_NAMESPACE]}})
    folder = tmp_path_factory.mktemp("checkov")
    (folder / "chart.yaml").write_text(yaml.safe_dump_all(chart))
    (folder / "workers.yaml").write_text(yaml.safe_dump_all(operator_objects(chart_settings(chart))))
    result = subprocess.run(
        [checkov, "-d", str(folder), "--framework", "kubernetes", "-o", "json", "--compact"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode in (0, 1), result.stderr  # 1: some check failed
    report = json.loads(result.stdout)
    return report[0] if isinstance(report, list) else report


def test_only_the_listed_exceptions_fail(checkov_report):
    failed = {(c["check_id"], c["resource"]) for c in checkov_report["results"]["failed_checks"]}
    unexpected = sorted(f"{check} on {resource}" for check, resource in failed if check not in EXCEPTIONS)
    assert not unexpected, "checkov fails beyond the listed exceptions:\n" + "\n".join(unexpected)
    scanned = {c["resource"].split(".")[0] for c in checkov_report["results"]["passed_checks"]}
    assert {"Pod", "Deployment"} <= scanned, scanned  # the scan saw the worker pods


def test_network_policies_cover_every_pod(checkov_report):
    failed = [c for c in checkov_report["results"]["failed_checks"] if c["check_id"] == "CKV2_K8S_6"]
    assert not failed, [c["resource"] for c in failed]


def test_the_chart_readme_lists_every_exception():
    readme = (CHART / "README.md").read_text()
    for check in EXCEPTIONS:
        assert f"`{check}`" in readme, f"{check} is not in the chart README's checkov exceptions"
