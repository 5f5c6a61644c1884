"""Spec validation: what the models refuse, and the names they give."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from finetune_operator.api import FineTuneJobSpec
from finetune_trainer.config import ConfigError, TrainerConfig, load_trainer_config

from .conftest import job_body


def spec(**overrides):
    body = job_body(**overrides)["spec"]
    return FineTuneJobSpec.model_validate(body)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"workers": 0}, "workers"),
        ({"gpusPerWorker": -1}, "gpusPerWorker"),
        ({"training": {"learningRate": 0}}, "training.learningRate"),
        ({"training": {"precision": "int4"}}, "training.precision"),
        ({"training": {"batchSize": 0}}, "training.batchSize"),
        ({"task": "translation"}, "task"),
        ({"dataset": {"path": "/d", "format": "parquet"}}, "dataset.format"),
        ({"lora": {"r": 0}}, "lora.r"),
        ({"lora": {"dropout": 1.0}}, "lora.dropout"),
        ({"checkpoint": {"intervalSteps": 0}}, "checkpoint.intervalSteps"),
        ({"restartPolicy": {"maxRestarts": -1}}, "restartPolicy.maxRestarts"),
        ({"model": ""}, "model"),
        ({"template": {"env": [{"name": "MASTER_ADDR", "value": "x"}]}}, "template.env"),
    ],
)
def test_bad_spec_is_refused_naming_the_field(overrides, field):
    with pytest.raises(ValidationError) as refused:
        spec(**overrides)
    locations = {".".join(str(p) for p in e["loc"]) for e in refused.value.errors(include_url=False)}
    assert any(loc.startswith(field) for loc in locations), locations


def test_defaults_follow_the_design():
    parsed = spec()
    assert (parsed.task, parsed.dataset.format, parsed.training.precision) == ("causal-lm", "alpaca", "auto")
    assert (parsed.lora.r, parsed.lora.alpha, parsed.checkpoint.interval_steps) == (16, 32, 100)
    assert parsed.world_size == 2 and parsed.processes_per_worker == 1


def test_world_size_counts_processes_per_gpu():
    assert spec(workers=3, gpusPerWorker=4).world_size == 12
    assert spec(workers=3, gpusPerWorker=0).world_size == 3


def test_classification_format_needs_classification_task():
    with pytest.raises(ValidationError, match="does not fit task"):
        spec(dataset={"path": "/d.csv", "format": "classification"})
    assert spec(task="sequence-classification", dataset={"path": "/d.csv", "format": "classification"})


def test_trainer_config_round_trips_through_yaml(tmp_path):
    config = spec(training={"maxSteps": 7}).trainer_config(output_dir="/out")
    path = tmp_path / "config.yaml"
    import yaml

    path.write_text(yaml.safe_dump(config.model_dump(mode="json", by_alias=True)))
    assert load_trainer_config(path) == config


def test_trainer_config_error_names_file_and_field(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("model: m\ndataset: {path: /d}\noutputDir: /o\ntraining: {learningRate: -1}\n")
    with pytest.raises(ConfigError, match=r"config.yaml: training.learningRate"):
        load_trainer_config(path)


def test_resume_fingerprint_ignores_where_and_how_often():
    base = spec().trainer_config(output_dir="/a")
    moved = spec(checkpoint={"keepLast": 9}).trainer_config(output_dir="/b")
    changed = spec(training={"learningRate": 1e-3}).trainer_config(output_dir="/a")
    assert base.resume_fingerprint() == moved.resume_fingerprint()
    assert base.resume_fingerprint() != changed.resume_fingerprint()
    assert isinstance(base, TrainerConfig)


@pytest.mark.parametrize(
    ("storage", "problem"),
    [
        ({}, "exactly one"),
        ({"persistentVolumeClaim": {"claimName": "runs"}, "emptyDir": {}}, "exactly one"),
        ({"emptyDir": {}, "modelCache": {"persistentVolumeClaim": {"claimName": ""}}}, "at least 1 character"),
        (
            {"emptyDir": {}, "modelCache": {"persistentVolumeClaim": {"claimName": "hf"}, "sizeLimit": "9Gi"}},
            "not both",
        ),
    ],
)
def test_storage_is_a_claim_or_a_stated_empty_dir(storage, problem):
    with pytest.raises(ValidationError, match=problem) as refused:
        spec(storage=storage)
    assert refused.value.errors()[0]["loc"][0] == "storage"


def test_the_crd_requires_storage_and_gives_it_no_default():
    from finetune_operator.crd import build_crd

    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert "storage" in schema["required"]
    assert "default" not in schema["properties"]["storage"]
    # In process (finetune local, where --output-dir is the storage) an omitted storage is an emptyDir.
    body = job_body()["spec"]
    body.pop("storage", None)
    assert FineTuneJobSpec.model_validate(body).storage.empty_dir is not None


@pytest.mark.parametrize(
    ("template", "field", "problem"),
    [
        ({"sidecars": [{"name": "trainer", "image": "x"}]}, "template.sidecars", "belongs to the operator"),
        ({"initContainers": [{"image": "x"}]}, "template.initContainers", "needs a name"),
        ({"capabilities": ["ALL"]}, "template.capabilities", "ALL is refused"),
        ({"capabilities": ["ipc_lock"]}, "template.capabilities", "not one capability"),
        ({"imagePullSecrets": [{"name": ""}]}, "template.imagePullSecrets", "at least 1"),
    ],
)
def test_template_additions_are_checked_naming_the_field(template, field, problem):
    with pytest.raises(ValidationError, match=problem) as refused:
        spec(template=template)
    locations = {".".join(str(p) for p in e["loc"]) for e in refused.value.errors(include_url=False)}
    assert any(loc.startswith(field) for loc in locations), locations


EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_is_valid_and_mounts_what_it_reads(path):
    """Each example parses, the operator would run it, and every absolute path it reads is on a volume."""
    from finetune_operator.api import FineTuneJob
    from finetune_operator.builders import build_gang, check_runnable
    from finetune_operator.config import OperatorSettings

    document = yaml.safe_load(path.read_text())
    job = FineTuneJob.model_validate(
        {"metadata": {**document["metadata"], "namespace": "ml", "uid": "u"}, "spec": document["spec"]}
    )
    check_runnable(job)
    read = [p for p in (job.spec.model, job.spec.dataset.path) if p.startswith("/")]
    for pod in build_gang(job, 0, OperatorSettings()):
        mounts = [m["mountPath"].rstrip("/") + "/" for m in pod["spec"]["containers"][0]["volumeMounts"]]
        for wanted in read:
            assert any(wanted.startswith(mount) for mount in mounts), f"{path.name}: nothing mounts {wanted}"


@pytest.mark.parametrize("seconds", [-1, 7 * 24 * 3600 + 1])
def test_a_negative_or_absurd_progress_deadline_is_refused(seconds):
    with pytest.raises(ValidationError, match=r"progressDeadlineSeconds|progress_deadline_seconds"):
        spec(restartPolicy={"progressDeadlineSeconds": seconds})


def test_a_progress_deadline_shorter_than_the_reports_is_refused_naming_both():
    with pytest.raises(ValidationError, match=r"progressDeadlineSeconds=20 .* reports every 10 s .* at least 30"):
        spec(restartPolicy={"progressDeadlineSeconds": 20})
    assert spec(restartPolicy={"progressDeadlineSeconds": 0}).restart_policy.progress_deadline_seconds == 0
    assert spec().restart_policy.progress_deadline_seconds == 1800
