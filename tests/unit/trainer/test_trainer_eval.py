"""Evaluation (issue 15, trainer side): metrics against a hand computation, uneven shards counted once,
held-out sets, bad eval data refused at setup, exact resume with evaluation on."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from finetune_trainer.batching import Collator
from finetune_trainer.config import TrainerConfig
from finetune_trainer.data import load_training_data, split_held_out
from finetune_trainer.entrypoint import run
from finetune_trainer.evaluation import evaluate
from finetune_trainer.model import SupervisedLoss, load_model, resolve_precision
from finetune_trainer.tiny import make_tiny_dataset, make_tiny_model
from tests.trainer.harness import write_config

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A tiny classification model (with a LoRA whose B is not zero), its tokenizer, and 5 eval examples."""
    tmp = tmp_path_factory.mktemp("classifier")
    model_dir = make_tiny_model(tmp / "model", task="sequence-classification")
    data = make_tiny_dataset(tmp / "train.jsonl", "classification", 40)
    config = TrainerConfig.model_validate(
        {
            "model": str(model_dir),
            "task": "sequence-classification",
            "dataset": {"path": str(data), "format": "classification"},
            "outputDir": str(tmp / "out"),
            "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        }
    )
    from finetune_trainer.model import load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    training = load_training_data(data, "classification", tokenizer, 64, "sequence-classification")
    torch.manual_seed(0)
    peft_model = load_model(config, tokenizer, resolve_precision("fp32", CPU), CPU, training.label_names)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "score" in name:
                param.normal_(0, 0.5)
    return peft_model, tokenizer, training.examples[:5]


def run_evaluation(loss_module, examples, collator, world_size: int, **kwargs) -> dict[str, float]:
    """evaluate() on each rank's share, the ranks' sums added as the all-reduce would (rank 0's result)."""
    shares: list[list[float]] = []

    def record(values: list[float]) -> list[float]:  # another rank's sums, kept for rank 0's all-reduce
        shares.append(values)
        return values

    for rank in range(world_size - 1, 0, -1):
        evaluate(loss_module, examples, collator, 2, rank, world_size, CPU, None, record, **kwargs)

    def reduce(values: list[float]) -> list[float]:
        return [sum(column) for column in zip(values, *shares, strict=True)]

    return evaluate(loss_module, examples, collator, 2, 0, world_size, CPU, None, reduce, **kwargs)


def test_classification_metrics_match_a_hand_computation_on_any_world_size(classifier):
    peft_model, tokenizer, examples = classifier
    loss_module = SupervisedLoss(peft_model, causal=False)
    peft_model.eval()
    with torch.no_grad():  # by hand: one example at a time, no padding at all
        logits = torch.cat([peft_model(input_ids=torch.tensor([e.input_ids])).logits for e in examples])
    targets = torch.tensor([e.labels for e in examples])
    predictions = logits.argmax(-1)
    f1s = []
    for c in sorted(set(targets.tolist()) | set(predictions.tolist())):
        tp = int(((predictions == c) & (targets == c)).sum())
        f1s.append(2 * tp / (int((predictions == c).sum()) + int((targets == c).sum())))
    expected = {
        "eval_loss": F.cross_entropy(logits, targets).item(),
        "eval_accuracy": (predictions == targets).float().mean().item(),
        "eval_f1": sum(f1s) / len(f1s),
    }
    peft_model.train()
    collator = Collator(tokenizer.pad_token_id, causal=False)
    for world_size in (1, 2, 3):  # 5 examples: shares of 3/2 and 2/2/1, each counted once
        metrics = run_evaluation(loss_module, examples, collator, world_size, num_labels=2)
        assert metrics == pytest.approx(expected, rel=1e-5), world_size
    assert peft_model.training  # evaluation puts the model back in training mode


def test_causal_eval_loss_is_the_mean_over_supervised_tokens(tiny_model, tiny_data, tokenizer):
    config = TrainerConfig.model_validate(
        {"model": str(tiny_model), "dataset": {"path": str(tiny_data)}, "outputDir": "/tmp/unused"}
    )
    torch.manual_seed(0)
    peft_model = load_model(config, tokenizer, resolve_precision("fp32", CPU), CPU, None)
    examples = load_training_data(tiny_data, "alpaca", tokenizer, 256).examples[:3]
    total, count = 0.0, 0
    peft_model.eval()
    with torch.no_grad():
        for e in examples:
            logits = peft_model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1]
            labels = torch.tensor(e.labels[1:])
            total += F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
            count += int((labels != -100).sum())
    peft_model.train()
    loss_module = SupervisedLoss(peft_model, causal=True)
    metrics = run_evaluation(loss_module, examples, Collator(tokenizer.pad_token_id, causal=True), 2)
    assert metrics["eval_loss"] == pytest.approx(total / count, rel=1e-5)
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_a_held_out_fraction_is_fixed_by_the_seed_and_disjoint(tiny_data, tokenizer):
    data = load_training_data(tiny_data, "alpaca", tokenizer, 256)
    train, held_out = split_held_out(data, 0.1, seed=3)
    assert len(held_out.examples) == round(0.1 * len(data.examples))
    assert len(train.examples) + len(held_out.examples) == len(data.examples)
    assert {id(e) for e in train.examples}.isdisjoint(id(e) for e in held_out.examples)
    assert split_held_out(data, 0.1, seed=3)[1].examples == held_out.examples
    assert split_held_out(data, 0.1, seed=4)[1].examples != held_out.examples


def test_an_eval_label_the_training_set_lacks_exits_2_naming_file_and_label(tmp_path, classifier):
    model_dir = classifier[0].get_base_model().name_or_path
    train = make_tiny_dataset(tmp_path / "train.jsonl", "classification", 16)
    evaluation = tmp_path / "eval.jsonl"
    evaluation.write_text('{"text": "one", "label": "odd"}\n{"text": "two", "label": "prime"}\n')
    config = write_config(
        tmp_path / "config.yaml",
        model_dir,
        train,
        tmp_path / "out",
        format="classification",
        task="sequence-classification",
        maxSteps=2,
    )
    text = config.read_text().replace("format: classification", f"format: classification\n  evalPath: {evaluation}")
    config.write_text(text)
    assert run(str(config)) == 2
    message = (tmp_path / "termination.log").read_text()
    assert "eval.jsonl:2: label 'prime' is not in the training set" in message
    assert not (tmp_path / "out" / "checkpoints").exists()  # refused at setup: nothing trained


def test_a_missing_eval_file_exits_2(tmp_path, tiny_model, tiny_data):
    config = write_config(tmp_path / "config.yaml", tiny_model, tiny_data, tmp_path / "out", maxSteps=2)
    config.write_text(config.read_text().replace("format: alpaca", "format: alpaca\n  evalPath: /nope/eval.jsonl"))
    assert run(str(config)) == 2
    assert "/nope/eval.jsonl: no such file" in (tmp_path / "termination.log").read_text()


def test_evaluation_is_reported_and_resume_stays_exact_with_it(tmp_path, tiny_model, tiny_data, capsys):
    reference = tmp_path / "reference"
    config = write_config(
        tmp_path / "config.yaml",
        tiny_model,
        tiny_data,
        reference,
        maxSteps=10,
        evalEverySteps=3,
        checkpoint={"intervalSteps": 4, "keepLast": 3},
    )
    config.write_text(config.read_text().replace("format: alpaca", "evalFraction: 0.1\n  format: alpaca"))
    assert run(str(config)) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [line["step"] for line in lines if "eval_loss" in line] == [3, 6, 9, 10]
    metrics = json.loads((reference / "metrics.json").read_text())
    assert metrics["eval_loss"] > 0 and metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert json.loads((reference / "progress.json").read_text())["evalLoss"] == pytest.approx(metrics["eval_loss"])

    resumed = tmp_path / "resumed"
    shutil.copytree(reference / "checkpoints" / "step-4", resumed / "checkpoints" / "step-4")
    resumed_config = tmp_path / "resumed.yaml"
    resumed_config.write_text(config.read_text().replace(str(reference), str(resumed)))
    assert run(str(resumed_config)) == 0
    ours = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    theirs = load_file(str(reference / "adapter" / "adapter_model.safetensors"))
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-6
    assert json.loads((resumed / "metrics.json").read_text())["eval_loss"] == pytest.approx(metrics["eval_loss"])


def test_keep_best_keeps_the_adapter_of_the_best_evaluation(tmp_path, tiny_model, tiny_data, capsys):
    config = write_config(
        tmp_path / "config.yaml",
        tiny_model,
        tiny_data,
        tmp_path / "out",
        maxSteps=8,
        evalEverySteps=2,
        learningRate=0.05,
        checkpoint={"intervalSteps": 4, "keepLast": 2, "keepBest": {"metric": "eval_loss"}},
    )
    config.write_text(config.read_text().replace("format: alpaca", "evalFraction: 0.1\n  format: alpaca"))
    assert run(str(config)) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    evals = {line["step"]: line["eval_loss"] for line in lines if "eval_loss" in line}
    best_step = min(evals, key=evals.get)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert (metrics["best_metric"], metrics["best_step"]) == ("eval_loss", best_step)
    assert metrics["best_value"] == pytest.approx(evals[best_step])
    # the progress report names it too, so that status.outputs.bestStep does
    assert json.loads((tmp_path / "out" / "progress.json").read_text())["bestStep"] == best_step
    best = load_file(str(tmp_path / "out" / "adapter-best" / "adapter_model.safetensors"))
    final = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
    same = all(torch.equal(best[k], final[k]) for k in best)
    assert same == (best_step == 8)  # the best adapter is the final one only if the last evaluation was best


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"checkpoint": {"keepBest": {}}}, "keepBest needs an eval set"),
        ({"dataset": {"evalFraction": 0.1}, "checkpoint": {"keepBest": {"metric": "eval_accuracy"}}}, "not reported"),
        ({"dataset": {"evalFraction": 0.1, "evalPath": "/e.jsonl"}}, "not both"),
    ],
)
def test_eval_settings_that_cannot_work_are_refused_naming_the_field(changes, expected):
    raw = {"model": "m", "dataset": {"path": "/d.jsonl"}, "outputDir": "/o"}
    for key, value in changes.items():
        raw[key] = {**raw.get(key, {}), **value}
    with pytest.raises(ValueError, match=expected):
        TrainerConfig.model_validate(raw)
