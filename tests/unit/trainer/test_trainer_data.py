"""Reading and tokenizing each data set format: prompt masking, truncation, and errors naming file:line."""

from __future__ import annotations

import json

import pytest

from finetune_trainer.data import (
    ALPACA_PROMPT_NO_INPUT,
    DEFAULT_CHAT_TEMPLATE,
    IGNORE_INDEX,
    DataError,
    classification_labels,
    load_training_data,
)
from finetune_trainer.tiny import make_tiny_dataset


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def trained_text(tokenizer, example):
    return tokenizer.decode(
        [t for t, label in zip(example.input_ids, example.labels, strict=False) if label != IGNORE_INDEX]
    )


def test_alpaca_trains_on_the_output_and_eos_only(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Spell out the numbers.", "output": "forty two"}])
    (example,) = load_training_data(path, "alpaca", tokenizer, 256).examples
    assert example.input_ids[0] == tokenizer.bos_token_id
    assert example.input_ids[-1] == example.labels[-1] == tokenizer.eos_token_id
    assert trained_text(tokenizer, example) == "forty two</s>"
    prompt = tokenizer.decode(
        example.input_ids[1 : example.labels.index(next(label for label in example.labels if label != IGNORE_INDEX))]
    )
    assert prompt == ALPACA_PROMPT_NO_INPUT.format(instruction="Spell out the numbers.")


def test_alpaca_with_input_puts_it_in_the_prompt(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Spell.", "input": "42", "output": "forty two"}])
    (example,) = load_training_data(path, "alpaca", tokenizer, 256).examples
    assert "### Input:\n42" in tokenizer.decode(example.input_ids)
    assert trained_text(tokenizer, example) == "forty two</s>"


def test_chat_trains_on_every_assistant_turn_and_nothing_else(tmp_path, tokenizer):
    messages = [
        {"role": "system", "content": "You spell numbers."},
        {"role": "user", "content": "7"},
        {"role": "assistant", "content": "seven"},
        {"role": "user", "content": "8"},
        {"role": "assistant", "content": "eight"},
    ]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}])
    (example,) = load_training_data(path, "chat", tokenizer, 256).examples
    assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert trained_text(tokenizer, example) == "seven<|im_end|>\neight<|im_end|>\n"


def test_chat_without_a_template_uses_the_default(tmp_path, tiny_model):
    from finetune_trainer.model import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model))
    tokenizer.chat_template = None
    path = write_jsonl(
        tmp_path / "c.jsonl",
        [{"messages": [{"role": "user", "content": "7"}, {"role": "assistant", "content": "seven"}]}],
    )
    (example,) = load_training_data(path, "chat", tokenizer, 256).examples
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    assert trained_text(tokenizer, example) == "seven<|im_end|>\n"


def test_text_trains_on_every_token(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "one two three"}])
    (example,) = load_training_data(path, "text", tokenizer, 256).examples
    assert example.labels[1:] == example.input_ids[1:]


def test_truncation_drops_examples_left_without_a_trained_token(tmp_path, tokenizer, caplog):
    long_prompt = "Spell out the numbers. " * 40
    path = write_jsonl(
        tmp_path / "a.jsonl", [{"instruction": long_prompt, "output": "one"}, {"instruction": "x", "output": "two"}]
    )
    data = load_training_data(path, "alpaca", tokenizer, 128)
    assert len(data.examples) == 1 and data.dropped == 1
    assert all(len(example.input_ids) <= 128 for example in data.examples)
    assert "dropped 1 of 2 examples" in caplog.text


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_classification_from_csv_or_jsonl(tmp_path, tokenizer, suffix):
    path = make_tiny_dataset(tmp_path / f"c{suffix}", "classification", 20)
    data = load_training_data(path, "classification", tokenizer, 64, task="sequence-classification")
    assert data.label_names == ["even", "odd"]
    assert len(data.examples) == 20 and {example.labels for example in data.examples} <= {0, 1}


def test_classification_labels_keep_integer_ids():
    assert classification_labels([2, 0, "1"]) == (["0", "1", "2"], {"0": 0, "1": 1, "2": 2})
    assert classification_labels(["neg", "pos", "neg"])[0] == ["neg", "pos"]


@pytest.mark.parametrize(
    ("format", "content", "expected"),
    [
        ("alpaca", '{"instruction": "a", "output": "b"}\n{"instruction": "a"\n', r"a\.jsonl:2: not valid JSON"),
        ("alpaca", '{"instruction": "a", "output": "b"}\n\n{"instruction": "a"}\n', r'a\.jsonl:3: missing "output"'),
        ("alpaca", '{"instruction": "a", "output": 3}\n', r'a\.jsonl:1: "output" must be a string'),
        ("alpaca", "[1, 2]\n", r"a\.jsonl:1: expected a JSON object"),
        ("chat", '{"messages": [{"role": "user", "content": "hi"}]}\n', r"a\.jsonl:1: .*no assistant message"),
        ("chat", '{"messages": [{"role": "bot", "content": "hi"}]}\n', r"a\.jsonl:1: messages\[0\]\.role"),
        ("text", '{"txt": "x"}\n', r'a\.jsonl:1: missing "text"'),
        ("classification", '{"text": "x", "label": null}\n', r'a\.jsonl:1: "label" must be'),
        ("text", "", r"holds no examples"),
    ],
)
def test_bad_records_name_the_file_and_line(tmp_path, tokenizer, format, content, expected):
    path = tmp_path / "a.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=expected):
        load_training_data(path, format, tokenizer, 64)


def test_missing_file_and_bad_csv_header(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"dataset\.path .*nope\.jsonl: no such file"):
        load_training_data(tmp_path / "nope.jsonl", "alpaca", tokenizer, 64)
    (tmp_path / "c.csv").write_text("sentence,label\nhi,1\n")
    with pytest.raises(DataError, match=r"c\.csv:1: .*missing text"):
        load_training_data(tmp_path / "c.csv", "classification", tokenizer, 64)
