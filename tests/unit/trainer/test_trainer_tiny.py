"""The offline tiny model and data sets that tests, `make demo` and benchmarks use."""

from __future__ import annotations

import csv
import json
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from finetune_trainer.tiny import main, make_tiny_dataset, make_tiny_model, spell_number


def test_tiny_model_loads_through_from_pretrained(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    ids = tokenizer("Spell out the numbers. 342", return_tensors="pt")
    assert ids["input_ids"][0, 0].item() == tokenizer.bos_token_id
    assert model(**ids).logits.shape[-1] == len(tokenizer)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "7"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\n7<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(tokenizer(" three hundred", add_special_tokens=False)["input_ids"]) == " three hundred"


def test_tiny_classifier_is_fast_to_make(tmp_path):
    started = time.monotonic()
    make_tiny_model(tmp_path, task="sequence-classification", num_labels=3)
    assert time.monotonic() - started < 10
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert model.config.num_labels == 3 and model.config.pad_token_id is not None
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[1, 50, 60]])).logits.shape == (1, 3)


@pytest.mark.parametrize("format", ["alpaca", "chat", "text", "classification"])
def test_tiny_datasets_are_deterministic(tmp_path, format):
    first = make_tiny_dataset(tmp_path / "a.jsonl", format, 5, seed=3).read_text()
    assert make_tiny_dataset(tmp_path / "b.jsonl", format, 5, seed=3).read_text() == first
    assert len(first.splitlines()) == 5 and all(isinstance(json.loads(line), dict) for line in first.splitlines())


def test_classification_csv(tmp_path):
    rows = list(csv.DictReader(make_tiny_dataset(tmp_path / "c.csv", "classification", 4).open()))
    assert len(rows) == 4 and {row["label"] for row in rows} <= {"even", "odd"}


def test_spell_number():
    assert [spell_number(n) for n in (0, 13, 40, 342, 900)] == [
        "zero",
        "thirteen",
        "forty",
        "three hundred forty two",
        "nine hundred",
    ]


def test_cli(tmp_path, capsys):
    assert main(["--data", str(tmp_path / "d.jsonl"), "--format", "text", "--examples", "3"]) == 0
    assert "3 text examples" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([])
