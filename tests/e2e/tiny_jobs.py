"""What the end-to-end tests run: a tiny offline model and data set, FineTuneJob specs that train it in
seconds, the DDP script of tests/e2e/scripts, and how to compare the adapters two runs produce."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from finetune_operator.api import API_VERSION, KIND

JOB = "tiny"
WORKERS = 2
TOTAL_STEPS = 24
CHECKPOINT_INTERVAL = 4
ASSETS_MOUNT = "/assets"  # where cluster workers see the tiny model and data (a hostPath volume)
SCRIPTS = Path(__file__).resolve().parent / "scripts"
DDP_SCRIPT = SCRIPTS / "ddp_allreduce.py"
ADAPTER_WEIGHTS = Path("adapter") / "adapter_model.safetensors"
# The operator's grace period for worker pods in these tests: the tiny trainer checkpoints in well under
# a second, and a worker stuck in a collective with a dead peer should not hold the next test for 60 s.
GRACE_SECONDS = 15


def make_assets(folder: Path) -> Path:
    """The tiny model (folder/model) and a text data set (folder/train.jsonl); returns folder."""
    from finetune_trainer.tiny import make_tiny_dataset, make_tiny_model

    make_tiny_model(folder / "model")
    make_tiny_dataset(folder / "train.jsonl", "text", 128)
    return folder


def tiny_spec(assets: str | Path = ASSETS_MOUNT, **overrides: Any) -> dict[str, Any]:
    """A 2-worker CPU job of TOTAL_STEPS steps, a checkpoint every CHECKPOINT_INTERVAL, no backoff.

    fp32 on CPU, so that a run resumed from a checkpoint gives the uninterrupted run's adapter to 1e-6.
    """
    spec: dict[str, Any] = {
        "model": f"{assets}/model",
        "task": "causal-lm",
        "dataset": {"path": f"{assets}/train.jsonl", "format": "text"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.05},
        "training": {
            "maxSteps": TOTAL_STEPS,
            "batchSize": 4,
            "learningRate": 3.0e-3,
            "lrScheduler": "cosine",
            "warmupSteps": 2,
            "maxSeqLength": 64,
            "precision": "fp32",
            "logEverySteps": 4,
        },
        "workers": WORKERS,
        "gpusPerWorker": 0,
        "checkpoint": {"intervalSteps": CHECKPOINT_INTERVAL, "keepLast": 3},
        "restartPolicy": {"maxRestarts": 2, "backoffSeconds": 0},
    }
    return _merge(spec, overrides)


def cluster_spec(assets_on_host: Path, **overrides: Any) -> dict[str, Any]:
    """tiny_spec for the local node: the assets mounted read-only at /assets (worker pods have their own
    /tmp, where pytest keeps them), the output on the claim `runs`."""
    spec = tiny_spec(ASSETS_MOUNT)
    spec["storage"] = {"persistentVolumeClaim": {"claimName": "runs"}}
    spec["template"] = {
        "volumes": [{"name": "assets", "hostPath": {"path": str(assets_on_host), "type": "Directory"}}],
        "volumeMounts": [{"name": "assets", "mountPath": ASSETS_MOUNT, "readOnly": True}],
    }
    return _merge(spec, overrides)


def ddp_spec(launcher: str) -> dict[str, Any]:
    """Our own DDP script as spec.command, e.g. [python, .../ddp_allreduce.py] or [torchrun, ...].

    The same spec runs under `finetune local` (which ignores volumes) and on the local node, where the
    scripts folder is mounted at its own path, so the command is the same whatever the checkout's path.
    """
    return {
        "model": "unused-by-the-script",
        "dataset": {"path": "unused-by-the-script"},
        "workers": WORKERS,
        "gpusPerWorker": 0,
        "command": [launcher, str(DDP_SCRIPT)],
        "storage": {"persistentVolumeClaim": {"claimName": "runs"}},
        "restartPolicy": {"maxRestarts": 0, "backoffSeconds": 0},
        "template": {
            "volumes": [{"name": "scripts", "hostPath": {"path": str(SCRIPTS), "type": "Directory"}}],
            "volumeMounts": [{"name": "scripts", "mountPath": str(SCRIPTS), "readOnly": True}],
        },
    }


def manifest(spec: dict[str, Any], name: str = JOB) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name}, "spec": spec}


def ddp_results(output: Path) -> list[dict[str, Any]]:
    return [json.loads((output / f"ddp-result-rank-{rank}.json").read_text()) for rank in range(WORKERS)]


def load_adapter(output: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(output / ADAPTER_WEIGHTS))


def adapter_difference(output: Path, reference: Path) -> float:
    """Largest absolute difference between two runs' adapter weights (the same tensors, or it fails)."""
    mine, theirs = load_adapter(output), load_adapter(reference)
    assert mine.keys() == theirs.keys(), f"different adapter tensors: {sorted(mine.keys() ^ theirs.keys())}"
    return max((mine[key] - theirs[key]).abs().max().item() for key in mine)


def metrics(output: Path) -> dict[str, Any]:
    return json.loads((output / "metrics.json").read_text())


def checkpoint_steps(output: Path) -> list[int]:
    """Steps of the complete checkpoints in a run's output folder, oldest first."""
    folder = output / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(path.name.removeprefix("step-")) for path in folder.glob("step-*"))


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged
