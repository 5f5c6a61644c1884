"""Tiny offline models and data sets for tests, demos and benchmarks: nothing is downloaded.

    python -m finetune_trainer.tiny --model-dir /tmp/tiny --data /tmp/train.jsonl --format alpaca

`make_tiny_model` saves a randomly initialised Llama-style model with a byte-level BPE tokenizer trained
on a built-in corpus (with a ChatML chat template), loadable with `from_pretrained`. `make_tiny_dataset`
writes a learnable task in any dataset format: spelling out numbers ("342" -> "three hundred forty two")
for causal-lm, and the parity of a spelled-out number for classification.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]

_ONES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
_TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_INSTRUCTIONS = ["Spell out the numbers.", "Write these numbers in words.", "Say the numbers in English."]


def spell_number(n: int) -> str:
    """English words for 0 <= n < 1000, e.g. 342 -> 'three hundred forty two'."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + ("" if ones == 0 else " " + _ONES[ones])
    hundreds, rest = divmod(n, 100)
    return _ONES[hundreds] + " hundred" + ("" if rest == 0 else " " + spell_number(rest))


def _number_task(rng: random.Random, max_items: int) -> tuple[str, str, str]:
    numbers = [rng.randrange(1000) for _ in range(rng.randint(1, max_items))]
    return (
        rng.choice(_INSTRUCTIONS),
        ", ".join(str(n) for n in numbers),
        ", ".join(spell_number(n) for n in numbers),
    )


def tiny_records(format: str, n_examples: int, seed: int = 0, max_items: int = 3) -> list[dict]:
    """The records make_tiny_dataset writes, as dicts (classification: text and label)."""
    rng = random.Random(seed)
    records: list[dict] = []
    for _ in range(n_examples):
        instruction, numbers, words = _number_task(rng, max_items)
        if format == "alpaca":
            records.append({"instruction": instruction, "input": numbers, "output": words})
        elif format == "chat":
            messages = [
                {"role": "user", "content": f"{instruction} {numbers}"},
                {"role": "assistant", "content": words},
            ]
            if rng.random() < 0.3:
                messages.insert(0, {"role": "system", "content": "You spell numbers."})
            records.append({"messages": messages})
        elif format == "text":
            records.append({"text": f"The numbers {numbers} are spelled {words}."})
        elif format == "classification":
            n = rng.randrange(1000)
            records.append({"text": spell_number(n), "label": "even" if n % 2 == 0 else "odd"})
        else:
            raise ValueError(f"unknown dataset format {format!r}: use alpaca, chat, text or classification")
    return records


def make_tiny_dataset(
    path: str | Path, format: str = "alpaca", n_examples: int = 64, *, seed: int = 0, max_items: int = 3
) -> Path:
    """Write n_examples of the tiny task as JSONL (CSV when format is classification and path ends in .csv).

    max_items bounds how many numbers one example spells: raise it for a spread of lengths (benchmarks).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = tiny_records(format, n_examples, seed=seed, max_items=max_items)
    if format == "classification" and path.suffix.lower() == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(records)
    else:
        path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def _tokenizer_corpus() -> list[str]:
    rng = random.Random(1234)
    corpus = [spell_number(n) + " " + str(n) for n in range(1000)]
    corpus += [" ".join(_number_task(rng, 5)) for _ in range(300)]
    corpus += [
        *_INSTRUCTIONS,
        "### Instruction:\n",
        "### Input:\n",
        "### Response:\n",
        "The numbers are spelled even odd.",
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
        "user assistant system You spell numbers.",
    ]
    return corpus


def make_tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on the built-in corpus; adds <s> like Llama's; ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    bos_id = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHATML_TEMPLATE,
        model_max_length=4096,
    )


def make_tiny_model(
    out_dir: str | Path,
    task: str = "causal-lm",
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    vocab_size: int = 512,
    pad_vocab_to: int | None = None,
    max_position_embeddings: int = 1024,
    num_labels: int = 2,
    seed: int = 0,
) -> Path:
    """Save a random Llama-style model and its tokenizer to out_dir; returns out_dir.

    task: "causal-lm" (LlamaForCausalLM) or "sequence-classification" (LlamaForSequenceClassification
    with num_labels). Loads back with AutoModelFor*.from_pretrained / AutoTokenizer.from_pretrained.
    vocab_size is the tokenizer's BPE target (the built-in corpus saturates near 1500); pad_vocab_to
    gives the model more embedding rows than the tokenizer has, as real checkpoints do, so that the LM
    head has a realistic share of the compute (benchmarks).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedModel

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tiny_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=max(len(tokenizer), pad_vocab_to or 0),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        num_labels=num_labels,  # type: ignore[call-arg]  # a PretrainedConfig kwarg LlamaConfig passes on
    )
    torch.manual_seed(seed)
    model: PreTrainedModel
    if task == "causal-lm":
        causal_lm = LlamaForCausalLM(config)
        # With the usual 0.02 init a frozen head caps the logits near +-1 and a LoRA can barely lower the
        # loss; a trained model's head has logits of a few units, which this scale gives.
        torch.nn.init.normal_(causal_lm.lm_head.weight, std=2 / hidden_size**0.5)
        model = causal_lm
    elif task == "sequence-classification":
        model = LlamaForSequenceClassification(config)
    else:
        raise ValueError(f"unknown task {task!r}: use causal-lm or sequence-classification")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune_trainer.tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", help="where to save the tiny model and tokenizer")
    parser.add_argument("--task", default="causal-lm", choices=["causal-lm", "sequence-classification"])
    parser.add_argument("--data", help="where to write the tiny data set")
    parser.add_argument("--format", default="alpaca", choices=["alpaca", "chat", "text", "classification"])
    parser.add_argument("--examples", type=int, default=256, help="number of examples (default 256)")
    parser.add_argument("--max-items", type=int, default=3, help="most numbers per example (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.model_dir and not args.data:
        parser.error("give --model-dir, --data or both")
    if args.model_dir:
        print(f"model: {make_tiny_model(args.model_dir, task=args.task, seed=args.seed)}")
    if args.data:
        path = make_tiny_dataset(args.data, args.format, args.examples, seed=args.seed, max_items=args.max_items)
        print(f"data: {path} ({args.examples} {args.format} examples)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
