"""Training data: read a data set file, check every record, and tokenize it with prompts masked out of the loss.

Formats (one JSON object per line, or CSV with a header for classification):
- alpaca: {"instruction", "input" (optional), "output"}; the prompt is ALPACA_PROMPT, only the output (and
  EOS) is trained on.
- chat: {"messages": [{"role", "content"}, ...]}; rendered with the tokenizer's chat template, or
  DEFAULT_CHAT_TEMPLATE (ChatML) when it has none; only assistant turns are trained on.
- text: {"text"}; every token is trained on.
- classification: {"text", "label"}; labels are class names or integer ids.
Examples longer than maxSeqLength are truncated; one left with no trained token is dropped with a warning.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError, DatasetFormat
from .files import unreadable

log = logging.getLogger(__name__)

IGNORE_INDEX = -100

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
# ChatML: used for chat data when the tokenizer has no chat template of its own.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT_ROLES = ("system", "user", "assistant", "tool")


class DataError(ConfigError):
    """The data set cannot be used; the message names the file and, where it can, the line."""


@dataclass(frozen=True)
class Example:
    """One tokenized example. labels: per-token targets (IGNORE_INDEX where masked) or a class id."""

    input_ids: list[int]
    labels: list[int] | int


@dataclass
class TrainingData:
    examples: list[Example]
    label_names: list[str] | None = None  # classification only: id -> name
    dropped: int = 0  # examples left with no trained token after truncation

    @property
    def lengths(self) -> list[int]:
        return [len(example.input_ids) for example in self.examples]


@dataclass
class _Record:
    line: int
    fields: dict[str, Any] = field(default_factory=dict)


def load_training_data(
    path: str | Path,
    format: str,
    tokenizer: Any,
    max_seq_length: int,
    task: str = "causal-lm",
    label_names: list[str] | None = None,
) -> TrainingData:
    """Read, check and tokenize the data set; raise DataError naming the file and line of any problem.

    label_names (classification): the classes of the training set; a label outside them is refused
    (an eval set is read with the training set's labels)."""
    path = Path(path)
    records = list(read_records(path, format))
    if not records:
        raise DataError(f"dataset.path {path}: the file holds no examples")
    if format == DatasetFormat.chat.value and not getattr(tokenizer, "chat_template", None):
        log.info("the tokenizer has no chat template: using the default (ChatML)")
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE  # saved with the adapter, so inference matches
    if format == DatasetFormat.classification.value:
        data = _tokenize_classification(path, records, tokenizer, max_seq_length, label_names)
    else:
        segments = [_segments(path, format, record, tokenizer) for record in records]
        # A chat template writes its own special tokens (and end-of-turn markers); raw text gets the
        # tokenizer's BOS and an EOS after the trained part.
        is_chat = format == DatasetFormat.chat.value
        prefix = [] if is_chat else _bos_prefix(tokenizer)
        eos = None if is_chat else tokenizer.eos_token_id
        data = _tokenize_segments(segments, tokenizer, max_seq_length, prefix, eos)
    if data.dropped:
        log.warning(
            "%s: dropped %d of %d examples whose trained part lies beyond training.maxSeqLength %d",
            path,
            data.dropped,
            len(records),
            max_seq_length,
        )
    if not data.examples:
        raise DataError(f"dataset.path {path}: no example has a trained token within maxSeqLength {max_seq_length}")
    return data


# --- reading -------------------------------------------------------------------------------------------


def read_records(path: Path, format: str) -> Iterator[_Record]:
    """Yield the records of a JSONL file (or a CSV file for classification), checked against the format."""
    denied = unreadable(path)
    if denied:
        raise DataError(f"dataset.path: {denied}")
    if not path.exists():
        raise DataError(f"dataset.path {path}: no such file")
    if path.is_dir():
        raise DataError(f"dataset.path {path}: is a directory, not a data file")
    if format == DatasetFormat.classification.value and path.suffix.lower() == ".csv":
        yield from _read_csv(path)
        return
    try:
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    fields = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from e
                record = _Record(number, fields)
                _check_record(path, format, record)
                yield record
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise DataError(f"dataset.path {path}: cannot read ({e.strerror})") from e


def _read_csv(path: Path) -> Iterator[_Record]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"text", "label"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(
                f"{path}:1: the CSV header needs columns text and label (missing {', '.join(sorted(missing))})"
            )
        for row in reader:
            record = _Record(reader.line_num, {"text": row["text"], "label": row["label"]})
            _check_record(path, DatasetFormat.classification.value, record)
            yield record


_REQUIRED: dict[str, dict[str, type]] = {
    "alpaca": {"instruction": str, "output": str},
    "text": {"text": str},
    "classification": {"text": str},
    "chat": {"messages": list},
}


def _check_record(path: Path, format: str, record: _Record) -> None:
    where = f"{path}:{record.line}"
    fields = record.fields
    if not isinstance(fields, dict):
        raise DataError(f"{where}: expected a JSON object with {', '.join(_REQUIRED[format])}")
    for key, kind in _REQUIRED[format].items():
        if key not in fields:
            raise DataError(f'{where}: missing "{key}" (format {format} needs {", ".join(_REQUIRED[format])})')
        if not isinstance(fields[key], kind):
            raise DataError(f'{where}: "{key}" must be a {"string" if kind is str else "list"}')
    if format == "alpaca" and not isinstance(fields.get("input", ""), str):
        raise DataError(f'{where}: "input" must be a string')
    if format == "classification":
        label = fields.get("label")
        if label is None or isinstance(label, bool) or not isinstance(label, (str, int)) or label == "":
            raise DataError(f'{where}: "label" must be a class name or an integer id')
    if format == "chat":
        _check_messages(where, fields["messages"])


def _check_messages(where: str, messages: list) -> None:
    if not messages:
        raise DataError(f'{where}: "messages" is empty')
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise DataError(f'{where}: messages[{i}] must be an object with a string "content"')
        if message.get("role") not in CHAT_ROLES:
            raise DataError(f"{where}: messages[{i}].role must be one of {', '.join(CHAT_ROLES)}")
    if not any(message["role"] == "assistant" for message in messages):
        raise DataError(f'{where}: "messages" has no assistant message to train on')


# --- tokenizing ------------------------------------------------------------------------------------------

# A record becomes text segments, each trained on or not; segments are tokenized separately and joined,
# so a prompt tokenizes exactly as it will at inference time.
Segment = tuple[str, bool]


def _segments(path: Path, format: str, record: _Record, tokenizer: Any) -> list[Segment]:
    fields = record.fields
    if format == "alpaca":
        instruction, input_text = fields["instruction"], fields.get("input", "")
        template = ALPACA_PROMPT if input_text else ALPACA_PROMPT_NO_INPUT
        return [(template.format(instruction=instruction, input=input_text), False), (fields["output"], True)]
    if format == "text":
        return [(fields["text"], True)]
    return _chat_segments(f"{path}:{record.line}", fields["messages"], tokenizer)


def _chat_segments(where: str, messages: list[dict], tokenizer: Any) -> list[Segment]:
    """Split a rendered conversation into prompt and assistant segments.

    Each assistant turn i spans from the end of render(messages[:i], generation prompt) to the end of
    render(messages[:i + 1]). Templates that rewrite earlier turns (so the prefixes do not line up) train
    on the last assistant turn only.
    """

    def render(part: list[dict], generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(part, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja raises its own errors (e.g. roles must alternate)
            raise DataError(f"{where}: the chat template cannot render this conversation: {e}") from e

    full = render(messages, False)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, through = render(messages[:i], True), render(messages[: i + 1], False)
        if not (full.startswith(through) and through.startswith(prompt)):
            last = max(j for j, m in enumerate(messages) if m["role"] == "assistant")
            prompt = render(messages[:last], True)
            start = _common_prefix_length(prompt, full)
            spans = [(start, len(render(messages[: last + 1], False)))]
            break
        spans.append((len(prompt), len(through)))
    segments: list[Segment] = []
    position = 0
    for start, end in spans:
        segments += [(full[position:start], False), (full[start:end], True)]
        position = end
    segments.append((full[position:], False))
    return [segment for segment in segments if segment[0]]


def _common_prefix_length(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _tokenize_segments(
    examples: list[list[Segment]], tokenizer: Any, max_seq_length: int, prefix: list[int], eos: int | None
) -> TrainingData:
    texts = [text for segments in examples for text, _ in segments]
    token_lists = iter(tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else iter(())
    data = TrainingData(examples=[])
    for segments in examples:
        input_ids: list[int] = []
        labels: list[int] = []
        for index, (_text, trained) in enumerate(segments):
            ids = next(token_lists)
            if index == 0 and prefix and ids[: len(prefix)] != prefix:
                input_ids += prefix
                labels += [IGNORE_INDEX] * len(prefix)
            input_ids += ids
            labels += ids if trained else [IGNORE_INDEX] * len(ids)
        if eos is not None and segments[-1][1] and (not input_ids or input_ids[-1] != eos):
            input_ids.append(eos)  # teach the model to stop after a trained answer
            labels.append(eos)
        input_ids, labels = input_ids[:max_seq_length], labels[:max_seq_length]
        if any(label != IGNORE_INDEX for label in labels[1:]):
            data.examples.append(Example(input_ids, labels))
        else:
            data.dropped += 1
    return data


def _bos_prefix(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts before a text (e.g. Llama's <s>), learnt by encoding ''."""
    with_special = tokenizer("", add_special_tokens=True)["input_ids"]
    return list(with_special) if tokenizer.eos_token_id not in with_special else []


def classification_labels(values: list[str | int]) -> tuple[list[str], dict[str, int]]:
    """Class names by id: integer ids (or digit strings) stand for themselves, names are sorted."""
    as_text = [str(value) for value in values]
    if all(text.isdigit() for text in as_text):
        count = max(int(text) for text in as_text) + 1
        names = [str(i) for i in range(count)]
    else:
        names = sorted(set(as_text))
    return names, {name: i for i, name in enumerate(names)}


def _tokenize_classification(
    path: Path, records: list[_Record], tokenizer: Any, max_seq_length: int, label_names: list[str] | None
) -> TrainingData:
    if label_names is None:
        names, ids = classification_labels([record.fields["label"] for record in records])
        if len(names) < 2:
            raise DataError(f"dataset.path {path}: classification needs at least two labels, found {names}")
    else:
        names, ids = label_names, {name: i for i, name in enumerate(label_names)}
        for record in records:
            if str(record.fields["label"]) not in ids:
                raise DataError(
                    f"{path}:{record.line}: label {record.fields['label']!r} is not in the training set "
                    f"(its labels: {', '.join(names)})"
                )
    encoded = tokenizer([record.fields["text"] for record in records], add_special_tokens=True)["input_ids"]
    examples = [
        Example(list(input_ids[:max_seq_length]), ids[str(record.fields["label"])])
        for input_ids, record in zip(encoded, records, strict=False)
    ]
    return TrainingData(examples=examples, label_names=names)


def split_held_out(data: TrainingData, fraction: float, seed: int) -> tuple[TrainingData, TrainingData]:
    """(train, eval): `fraction` of the examples (at least one, chosen by seed) held out, both in file order."""
    import torch

    count = max(1, round(fraction * len(data.examples)))
    if count >= len(data.examples):
        raise DataError(f"dataset.evalFraction {fraction} leaves no training example of {len(data.examples)}")
    generator = torch.Generator().manual_seed(seed * 7_919 + 1)
    held_out = set(torch.randperm(len(data.examples), generator=generator)[:count].tolist())
    train = [e for i, e in enumerate(data.examples) if i not in held_out]
    evaluation = [e for i, e in enumerate(data.examples) if i in held_out]
    return (
        TrainingData(train, data.label_names, data.dropped),
        TrainingData(evaluation, data.label_names),
    )
