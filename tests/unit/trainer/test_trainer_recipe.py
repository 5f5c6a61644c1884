"""The whole recipe in one process on the tiny model: learning, outputs, resume, and exit codes."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from finetune_trainer.config import load_trainer_config
from finetune_trainer.contract import ProgressReport
from finetune_trainer.distributed import LaunchEnv
from finetune_trainer.entrypoint import run
from finetune_trainer.loop import Recipe
from finetune_trainer.tiny import make_tiny_dataset
from tests.trainer.harness import write_config

ALL_LINEAR = {
    "r": 8,
    "alpha": 16,
    "dropout": 0.0,
    "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def losses(stdout: str) -> list[float]:
    return [json.loads(line)["loss"] for line in stdout.splitlines() if line.startswith("{")]


def adapter(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output_dir / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize(
    ("task", "format", "data_name", "auto_class"),
    [
        ("causal-lm", "alpaca", "train.jsonl", AutoModelForCausalLM),
        ("sequence-classification", "classification", "train.csv", AutoModelForSequenceClassification),
    ],
)
def test_loss_falls_and_the_saved_adapter_gives_the_trained_model(
    tmp_path, tiny_model, capsys, task, format, data_name, auto_class
):
    data = make_tiny_dataset(tmp_path / data_name, format, 128)
    config = write_config(
        tmp_path / "config.yaml",
        tiny_model,
        data,
        tmp_path / "out",
        format=format,
        task=task,
        lora=ALL_LINEAR,
        maxSteps=40,
        batchSize=8,
        gradientAccumulationSteps=1,
        learningRate=1e-2,
        warmupSteps=0,
        logEverySteps=5,
        lrScheduler="constant",
    )
    recipe = Recipe(load_trainer_config(config), LaunchEnv())
    try:
        recipe.setup()
        assert recipe.train() == "done"
        recipe.save_outputs()
    finally:
        recipe.cleanup()
    first, *_, last = losses(capsys.readouterr().out)
    assert last < first * (0.7 if task == "causal-lm" else 0.95), (first, last)

    if task == "sequence-classification":  # the adapter says which class id is which label
        from transformers import AutoConfig

        saved = AutoConfig.from_pretrained(tmp_path / "out" / "adapter")
        assert saved.id2label == {0: "even", 1: "odd"} and saved.label2id == {"even": 0, "odd": 1}
    base_kwargs = {"num_labels": 2} if task == "sequence-classification" else {}
    loaded = PeftModel.from_pretrained(
        auto_class.from_pretrained(tiny_model, **base_kwargs), tmp_path / "out" / "adapter"
    )
    trained = recipe.peft_model
    inputs = {"input_ids": torch.tensor([[1, 40, 50, 60, 70, 2]]), "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    loaded.eval(), trained.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, trained(**inputs).logits)


@pytest.fixture(scope="module")
def finished_run(tiny_model, tiny_data, tmp_path_factory):
    """A 12-step run with checkpoints at 4, 8 and 12: its dir, config, stdout, termination message and the
    progress updates its on_progress hook received."""
    tmp = tmp_path_factory.mktemp("finished")
    config = write_config(
        tmp / "config.yaml",
        tiny_model,
        tiny_data,
        tmp / "out",
        maxSteps=12,
        checkpoint={"intervalSteps": 4, "keepLast": 3},
    )
    mp = pytest.MonkeyPatch()
    mp.setenv("FINETUNE_TERMINATION_LOG", str(tmp / "termination.log"))
    import contextlib
    import io

    stdout, updates = io.StringIO(), []
    try:
        with contextlib.redirect_stdout(stdout):
            code = run(str(config), on_progress=updates.append)
    finally:
        mp.undo()
    assert code == 0
    return tmp / "out", config, stdout.getvalue(), (tmp / "termination.log").read_text(), updates


def test_a_run_writes_the_contracted_outputs(finished_run):
    output_dir, _, stdout, termination, updates = finished_run
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert [line["step"] for line in lines] == [3, 6, 9, 12]
    for key in (
        "loss",
        "lr",
        "samples_per_second",
        "tokens_per_second",
        "supervised_tokens_per_second",
        "mfu",
        "epoch",
    ):
        assert key in lines[0]
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 12 and metrics["restarts"] == 0 and metrics["resumed_from_step"] is None
    assert metrics["train_tokens_per_second"] > metrics["train_samples_per_second"] > 0
    progress = json.loads((output_dir / "progress.json").read_text())
    assert (progress["step"], progress["totalSteps"], progress["lastCheckpointStep"]) == (12, 12, 12)
    # every metric line and every checkpoint reaches the hook, as {step, lastCheckpointStep}, in order, among
    # the liveness reports the progress deadline watches (loading first, then steps, saving)
    pairs = iter([(u.step, u.last_checkpoint_step) for u in updates])
    assert all(pair in pairs for pair in [(3, None), (4, 4), (6, 4), (8, 8), (9, 8)])
    assert updates[0].activity == "loading" and {u.activity for u in updates} == {"loading", "training", "saving"}
    assert updates[-1] == ProgressReport.model_validate(progress)
    assert sorted(p.name for p in (output_dir / "checkpoints").iterdir()) == ["step-12", "step-4", "step-8"]
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {
        p.name for p in (output_dir / "adapter").iterdir()
    }
    assert (
        termination.startswith("done: step 12/12, checkpoint ") and "step-12" in termination and "loss" in termination
    )


def test_a_truncated_newest_checkpoint_is_skipped_and_the_run_completes(finished_run, tmp_path, caplog):
    output_dir, config, *_ = finished_run
    copy = tmp_path / "out"
    shutil.copytree(output_dir / "checkpoints", copy / "checkpoints")
    weights = copy / "checkpoints" / "step-12" / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    config_copy = tmp_path / "config.yaml"
    config_copy.write_text(config.read_text().replace(str(output_dir), str(copy)))
    with caplog.at_level(logging.WARNING):
        assert run(str(config_copy)) == 0
    assert "skipping corrupt checkpoint" in caplog.text and "step-12" in caplog.text
    metrics = json.loads((copy / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 8 and metrics["restarts"] == 1
    ours, reference = adapter(copy), adapter(output_dir)
    assert max((ours[k] - reference[k]).abs().max().item() for k in ours) <= 1e-6


def test_a_checkpoint_of_another_config_is_refused_naming_the_field(finished_run, tmp_path):
    output_dir, config, *_ = finished_run
    copy = tmp_path / "out"
    shutil.copytree(output_dir / "checkpoints", copy / "checkpoints")
    changed = tmp_path / "config.yaml"
    changed.write_text(
        config.read_text().replace(str(output_dir), str(copy)).replace("learningRate: 0.003", "learningRate: 0.001")
    )
    assert run(str(changed)) == 2
    message = (tmp_path / "termination.log").read_text()
    assert "different config" in message and "training.learningRate (0.003 -> 0.001)" in message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("model: m\ndataset: {path: d}\noutputDir: o\ntraining: {batchSize: 0}\n", "training.batchSize"),
        ("model: m\ndataset: {path: d}\noutputDir: o\ntraining: {bachSize: 4}\n", "training.bachSize"),
        ("model: m\ndataset: {path: d, format: classification}\noutputDir: o\n", "does not fit task"),
        ("model: [unclosed\n", "not valid YAML"),
    ],
)
def test_a_bad_config_exits_2_naming_the_field(tmp_path, content, expected):
    path = tmp_path / "config.yaml"
    path.write_text(content)
    assert run(str(path)) == 2
    assert expected in (tmp_path / "termination.log").read_text()


def test_a_missing_config_file_exits_2(tmp_path):
    assert run(str(tmp_path / "nope.yaml")) == 2
    assert "nope.yaml" in (tmp_path / "termination.log").read_text()


def test_bad_data_exits_2_naming_the_file_and_line(tmp_path, tiny_model):
    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    assert run(str(write_config(tmp_path / "config.yaml", tiny_model, data, tmp_path / "out"))) == 2
    assert 'train.jsonl:3: missing "output"' in (tmp_path / "termination.log").read_text()


def test_chat_with_gradient_checkpointing_and_a_merged_model(tmp_path, tiny_model):
    data = make_tiny_dataset(tmp_path / "chat.jsonl", "chat", 32)
    config = write_config(
        tmp_path / "config.yaml",
        tiny_model,
        data,
        tmp_path / "out",
        format="chat",
        maxSteps=4,
        gradientCheckpointing=True,
        mergeAdapter=True,
    )
    assert run(str(config)) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged")
    with_adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model), tmp_path / "out" / "adapter"
    )
    inputs = {"input_ids": torch.tensor([[4, 40, 50, 60, 5]])}
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, with_adapter.eval()(**inputs).logits, rtol=1e-4, atol=1e-4)


def test_dataset_too_small_for_one_step_exits_2(tmp_path, tiny_model):
    data = make_tiny_dataset(tmp_path / "train.jsonl", "alpaca", 2)
    config = write_config(
        tmp_path / "config.yaml", tiny_model, data, tmp_path / "out", batchSize=2, gradientAccumulationSteps=2
    )
    assert run(str(config)) == 2
    assert "fewer than one optimizer step" in (tmp_path / "termination.log").read_text()


def test_an_output_dir_the_trainer_cannot_write_exits_2_naming_storage_before_any_step(tmp_path, tiny_model, tiny_data):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the claim's directory should be\n")  # fails for root too, unlike chmod
    output_dir = blocker / "out"
    assert run(str(write_config(tmp_path / "config.yaml", tiny_model, tiny_data, output_dir))) == 2
    message = (tmp_path / "termination.log").read_text()
    assert "spec.storage" in message and str(output_dir) in message and "uid" in message
    assert blocker.read_text().startswith("a file")


def test_check_writable_leaves_nothing_behind(tmp_path):
    from finetune_trainer.files import check_writable

    check_writable(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir() and not list((tmp_path / "a" / "b").iterdir())


def test_a_model_path_this_worker_cannot_read_exits_2_naming_spec_model(tmp_path, tiny_data):
    missing = tmp_path / "models" / "llama"  # as in a worker that does not mount worker-0's claim
    assert run(str(write_config(tmp_path / "config.yaml", missing, tiny_data, tmp_path / "out"))) == 2
    message = (tmp_path / "termination.log").read_text()
    assert "spec.model" in message and str(missing) in message and "every worker" in message
    assert not (tmp_path / "out" / "metrics.json").exists()
