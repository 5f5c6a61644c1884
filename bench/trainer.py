"""Benchmark: our trainer vs Hugging Face Trainer + peft, one CPU process, same model, data, LoRA, batch.

    python bench/trainer.py                            # print the table
    python bench/trainer.py --record bench/RESULTS.md  # and replace the "Trainer vs Hugging Face Trainer" section
    python bench/trainer.py --scenarios small-vocab    # one workload's rows only (not recordable)

Both train one epoch of the same tokenized alpaca-format data (prompt tokens masked out of the loss) on the
same randomly initialised Llama-style model, LoRA r=16 on q_proj/v_proj with dropout on (both in training
mode), fp32, batch size 8, AdamW, cosine schedule; on two data sets: varied lengths, and short nearly
uniform examples (where this trainer also runs with packing). Each trial runs in a fresh process, the trials
alternate between the contenders, and the table gives the fastest trial's wall clock and the median process
CPU time. Each process uses one thread by default (--threads): on a machine shared with other work, multi-threaded
timings swing by several times from trial to trial. Only the training call is timed (ours:
Recipe.train(), which also writes the final checkpoint; theirs: Trainer.train()); model loading and
tokenization are not. Tokens are the real (non-padding) tokens of the epoch, the same for every contender.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "trainer"))

from results import cpu_name, record_section  # noqa: E402

SECTION = "## Trainer vs Hugging Face Trainer"
# About 3.9M parameters, a quarter of them in the LM head, as in small real models (Qwen2.5-0.5B: 27%).
MODEL = {
    "hidden_size": 256,
    "num_layers": 4,
    "num_heads": 8,
    "num_kv_heads": 4,
    "intermediate_size": 688,
    "pad_vocab_to": 4096,
}
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}
BATCH_SIZE = 8
LEARNING_RATE = 2e-4
MAX_SEQ_LENGTH = 512
CONTENDERS = {
    "ours": "this trainer (defaults: length-grouped batches, last layer and LM head on targets only)",
    "ours-packed": "this trainer, packing (rows of 256 tokens, maxTokensPerBatch 512)",
    "hf": "HF Trainer + peft (defaults: random batches padded to the longest)",
    "hf-grouped": "HF Trainer + peft, group_by_length",
}
# Data sets: "varied" spreads lengths (1-12 numbers per example); "short" is short, nearly uniform examples,
# where grouping by length saves little and packing is the lever; "small-vocab" is short uniform examples on
# a model with a vocabulary of 1024 and LoRA r=8 on q/v, 400 steps, where neither the length grouping nor
# the LM head on targets saves much (3% of its tokens are supervised: the last layer on targets saves most).
SCENARIOS = {
    "varied": {"file": "train.jsonl", "max_items": 12, "contenders": ["ours", "hf", "hf-grouped"]},
    "short": {"file": "short.jsonl", "max_items": 1, "contenders": ["ours", "ours-packed", "hf"]},
    "small-vocab": {
        "file": "small-vocab.jsonl",
        "max_items": 1,
        "contenders": ["ours", "hf"],
        "model": "model-1k",
        "examples": 400 * BATCH_SIZE,
        "lora_r": 8,
    },
}
SMALL_VOCAB = 1024
PACKED = {"packing": True, "maxSeqLength": 256, "maxTokensPerBatch": 512}


COLUMNS = [
    "trainer",
    "steps",
    "padding",
    "samples/s",
    "tokens/s",
    "vs HF Trainer",
    "samples/CPU-s",
    "tokens/CPU-s",
    "vs HF Trainer (CPU)",
    "trials, wall (s)",
]
TABLE_HEADER = "| " + " | ".join(COLUMNS) + " |\n" + "| --- " * len(COLUMNS) + "|"


def lora_settings(scenario: str) -> dict:
    """LORA with the scenario's rank (alpha twice the rank, as in LORA)."""
    r = SCENARIOS[scenario].get("lora_r", LORA["r"])
    return {**LORA, "r": r, "alpha": 2 * r}


def lora_spec(scenario: str) -> dict:
    """The scenario's LoRA as the spec's lora field spells it, for this trainer's config."""
    lora = lora_settings(scenario)
    return {"r": lora["r"], "alpha": lora["alpha"], "dropout": lora["dropout"], "targetModules": lora["target_modules"]}


def prepare(workdir: Path, examples: int) -> None:
    from finetune_trainer.tiny import make_tiny_dataset, make_tiny_model

    make_tiny_model(workdir / "model", **MODEL)
    make_tiny_model(workdir / "model-1k", **{**MODEL, "pad_vocab_to": SMALL_VOCAB})
    for scenario in SCENARIOS.values():
        count = scenario.get("examples", examples)
        make_tiny_dataset(workdir / scenario["file"], "alpaca", count, seed=1, max_items=scenario["max_items"])


def tokenized(workdir: Path, scenario: str):
    from finetune_trainer.data import load_training_data
    from finetune_trainer.model import load_tokenizer

    spec = SCENARIOS[scenario]
    tokenizer = load_tokenizer(str(workdir / spec.get("model", "model")))
    return tokenizer, load_training_data(workdir / spec["file"], "alpaca", tokenizer, MAX_SEQ_LENGTH).examples


def run_ours(workdir: Path, scenario: str, packed: bool) -> dict:
    from finetune_trainer.config import TrainerConfig
    from finetune_trainer.distributed import LaunchEnv
    from finetune_trainer.entrypoint import _quiet_libraries
    from finetune_trainer.loop import Recipe

    _quiet_libraries()
    config = TrainerConfig.model_validate(
        {
            "model": str(workdir / SCENARIOS[scenario].get("model", "model")),
            "dataset": {"path": str(workdir / SCENARIOS[scenario]["file"]), "format": "alpaca"},
            "lora": lora_spec(scenario),
            "training": {
                "epochs": 1,
                "batchSize": BATCH_SIZE,
                "learningRate": LEARNING_RATE,
                "lrScheduler": "cosine",
                "maxSeqLength": MAX_SEQ_LENGTH,
                "precision": "fp32",
                "logEverySteps": 10,
                **(PACKED if packed else {}),
            },
            "checkpoint": {"intervalSteps": 100_000},
            "outputDir": tempfile.mkdtemp(prefix="ours-out-", dir=workdir),  # fresh: no resuming a previous trial
        }
    )
    recipe = Recipe(config, LaunchEnv())
    recipe.setup()
    with contextlib.redirect_stdout(io.StringIO()):
        started, cpu_started = time.perf_counter(), time.process_time()
        recipe.train()
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    recipe.cleanup()
    s = recipe.meter.session
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "steps": recipe.progress.step,
        "samples": s.samples,
        "tokens": s.tokens,
        "padded": s.padded,
    }


def run_hf(workdir: Path, scenario: str, grouped: bool) -> dict:
    import dataclasses

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tokenizer, examples = tokenized(workdir, scenario)
    dataset = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    model_dir = workdir / SCENARIOS[scenario].get("model", "model")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = lora_settings(scenario)
    model = get_peft_model(
        model,
        LoraConfig(
            r=lora["r"],
            lora_alpha=lora["alpha"],
            lora_dropout=lora["dropout"],
            target_modules=lora["target_modules"],
            task_type="CAUSAL_LM",
        ),
    )
    padded = {"tokens": 0}
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    def counting_collator(features):
        batch = collate(features)
        padded["tokens"] += batch["input_ids"].numel()
        return batch

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    grouping = {}
    if grouped:  # transformers 5 renamed group_by_length
        grouping = (
            {"train_sampling_strategy": "group_by_length"}
            if "train_sampling_strategy" in fields
            else {"group_by_length": True}
        )
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="hf-out-", dir=workdir),
        per_device_train_batch_size=BATCH_SIZE,
        num_train_epochs=1,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="cosine",
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=42,
        **grouping,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=counting_collator)
    started, cpu_started = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(io.StringIO()):
        output = trainer.train()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "steps": output.global_step,
        "samples": len(dataset),
        "tokens": sum(len(e.input_ids) for e in examples),
        "padded": padded["tokens"],
    }


def trial(workdir: Path, scenario: str, contender: str, threads: int) -> dict:
    command = [sys.executable, __file__, "--worker", f"{scenario}:{contender}", "--workdir", str(workdir)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{contender} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def summarize(results: dict[str, list[dict]]) -> dict[str, dict]:
    """Per contender: throughput of the fastest trial (other work only ever slows a trial down) and of
    the median process CPU time (one thread: the work done, whatever else shares the machine)."""
    table = {}
    for contender, runs in results.items():
        best = min(run["seconds"] for run in runs)
        cpu = statistics.median(run["cpu_seconds"] for run in runs)
        run = runs[0]
        table[contender] = {
            "steps": run["steps"],
            "padding": 1 - run["tokens"] / run["padded"],
            "samples_per_second": run["samples"] / best,
            "tokens_per_second": run["tokens"] / best,
            "samples_per_cpu_second": run["samples"] / cpu,
            "tokens_per_cpu_second": run["tokens"] / cpu,
            "trials": [round(r["seconds"], 1) for r in runs],
        }
    return table


def table_rows(table: dict[str, dict]) -> str:
    hf = table["hf"]
    return "\n".join(
        f"| {CONTENDERS[name]} | {row['steps']} | {100 * row['padding']:.1f}% | "
        f"{row['samples_per_second']:.1f} | {row['tokens_per_second']:.0f} | "
        f"**{row['samples_per_second'] / hf['samples_per_second']:.2f}x** | "
        f"{row['samples_per_cpu_second']:.1f} | {row['tokens_per_cpu_second']:.0f} | "
        f"**{row['samples_per_cpu_second'] / hf['samples_per_cpu_second']:.2f}x** | {row['trials']} |"
        for name, row in table.items()
    )


def render(tables: dict[str, dict[str, dict]], command: str, examples: int, threads: int) -> str:
    import peft
    import torch
    import transformers

    setup = textwrap.fill(
        f"One CPU process with {threads} thread{'s' if threads > 1 else ''}, fp32. Model: random Llama-style, "
        f"hidden {MODEL['hidden_size']}, {MODEL['num_layers']} layers, {MODEL['num_heads']} heads "
        f"({MODEL['num_kv_heads']} KV), MLP {MODEL['intermediate_size']}, vocabulary {MODEL['pad_vocab_to']} (a "
        "byte-level BPE of ~1500 tokens with the embedding rows padded, as real checkpoints do, so that the LM "
        "head is a quarter of the weights, as in Qwen2.5-0.5B), from `finetune_trainer.tiny`. Data: "
        f"{examples} alpaca-format examples of the tiny number-spelling task (prompt masked), one epoch, batch "
        f"size {BATCH_SIZE}, maxSeqLength {MAX_SEQ_LENGTH}. LoRA r={LORA['r']}, alpha={LORA['alpha']}, "
        f"dropout={LORA['dropout']} on {', '.join(LORA['target_modules'])}, in training mode in every row (so "
        f"LoRA dropout is on in all of them); AdamW lr {LEARNING_RATE}, cosine. Only the training call is timed; "
        "tokens are real (non-padding) tokens, the same set for every row of a table.",
        width=110,
    )
    return f"""{SECTION}

{setup}

Wall clock: the fastest of the trials (other work on the machine only ever slows a trial down). CPU: the
median process CPU time, which with one thread is the work done whatever shares the machine.

Varied lengths (1-12 numbers per example):

{TABLE_HEADER}
{table_rows(tables["varied"])}

Short, nearly uniform examples (one number each), where grouping by length saves little:

{TABLE_HEADER}
{table_rows(tables["short"])}

Short, nearly uniform examples on the model with a vocabulary of {SMALL_VOCAB}, LoRA r=8 (alpha 16) on q/v,
{SCENARIOS["small-vocab"]["examples"]} examples (400 steps), where the LM head is small and neither length
grouping nor the head on targets saves much (the last layer on targets does):

{TABLE_HEADER}
{table_rows(tables["small-vocab"])}

- Date: {datetime.date.today().isoformat()}; machine: {platform.machine()}, {os.cpu_count()} CPU cores
  ({cpu_name()}), shared with other work (load average {os.getloadavg()[0]:.1f} at the end);
  torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__},
  Python {platform.python_version()}.
- Command: `{command}`
- Where the difference comes from: batches of similar-length examples (little padding), the work after
  the last layer's keys and values done only at supervised positions (the last decoder layer's queries,
  attention, o_proj and MLP, and the LM head and cross-entropy: the prompt's logits are never computed),
  and no attention mask for batches without padding (SDPA's fused causal path). HF Trainer's
  group_by_length gets the first; the other two are this trainer's own. On short examples the
  supervised-positions saving dominates (with 4 layers, the last is a quarter of the model's compute);
  packing removes the last padding but on CPU (where compute follows tokens, not rows) it gains little and
  its block-diagonal mask takes SDPA off its fused path; its lever is the GPU, where a packed row keeps the
  matrix multiplications large (see bench/gpu.py).
- GPU (tokens/s, MFU, peak memory, bf16): see the bench/gpu.py section.
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    parser.add_argument("--record", type=Path, help="RESULTS.md to write the section into")
    parser.add_argument(
        "--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS), help="workloads (default: all)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        scenario, contender = args.worker.split(":")
        if contender.startswith("ours"):
            result = run_ours(args.workdir, scenario, packed=contender == "ours-packed")
        else:
            result = run_hf(args.workdir, scenario, grouped=contender == "hf-grouped")
        print(json.dumps(result))
        return 0
    if args.record and args.scenarios != list(SCENARIOS):
        parser.error("--record needs every scenario (the section has a table for each)")
    tables = {}
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        workdir = Path(tmp)
        prepare(workdir, args.examples)
        for scenario in args.scenarios:
            spec = SCENARIOS[scenario]
            results: dict[str, list[dict]] = {name: [] for name in spec["contenders"]}
            for repeat in range(args.repeats):
                for name in spec["contenders"]:
                    results[name].append(trial(workdir, scenario, name, args.threads))
                    run = results[name][-1]
                    print(
                        f"{scenario} trial {repeat + 1}/{args.repeats} {name}: {run['seconds']:.2f} s, "
                        f"CPU {run['cpu_seconds']:.2f} s, load average {os.getloadavg()[0]:.1f}",
                        file=sys.stderr,
                    )
            tables[scenario] = summarize(results)
            rows = table_rows(tables[scenario])
            print(f"{scenario} (load average {os.getloadavg()[0]:.1f}):\n{TABLE_HEADER}\n{rows}", file=sys.stderr)
    if args.scenarios != list(SCENARIOS):
        return 0
    command = (
        "python bench/trainer.py"
        + "".join(
            f" --{name} {value}"
            for name, value, default in (
                ("examples", args.examples, 256),
                ("repeats", args.repeats, 5),
                ("threads", args.threads, 1),
            )
            if value != default
        )
        + (f" --record {args.record}" if args.record else "")
    )
    section = render(tables, command, args.examples, args.threads)
    print(section)
    if args.record:
        record_section(section, args.record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
