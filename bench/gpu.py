"""Benchmark: the trainer on one GPU at real model sizes: tokens/s, MFU, peak memory, checkpoint overhead.

    python bench/gpu.py                                   # Llama 3.2 1B and 3.1 8B shapes, every variant
    python bench/gpu.py --record bench/RESULTS.md         # and replace the "GPU training throughput" section
    python bench/gpu.py --models 1b --steps 20            # a quicker look
    python bench/gpu.py --tiny                            # a tiny model on CPU: what the tests run

Each model is a randomly initialised Llama of the real architecture (nothing is downloaded; the tokenizer is
the tiny BPE of finetune_trainer.tiny, the embedding rows padded to the real vocabulary of 128256), saved
once in bf16 by a process of its own (which exits, freeing the GPU, before anything is measured) and loaded
by the trainer as any model. LoRA r=16 on all attention and MLP projections, bf16,
sequences of up to 2048 tokens (synthetic text examples of 150 to 2048 tokens, Alpaca-like in their spread),
micro-batches cut by a token budget, with and without packing, gradient checkpointing and compiled layers
(training.compile: its warmup steps include the compile, so give it --warmup 10 or more). Every variant runs
in a fresh process (peak memory is its own; an out-of-memory variant is reported as such and the others go
on): --warmup steps, then --steps measured steps. Tokens/s and MFU (LoRA counted as 4N FLOPs per token plus
causal attention, as metrics.py counts them, against the GPU's dense bf16 peak) are over the measured steps;
peak memory is torch's peak allocation in the variant's own process; the checkpoint overhead is one
checkpoint's time against 100 steps (the default checkpoint.intervalSteps). Variants without a token budget
of their own ("default") use the budget the trainer derives from the GPU's memory (memory.py).
The goal to report against: 50% MFU.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "trainer"))

from results import cpu_name, record_section  # noqa: E402

SECTION = "## GPU training throughput (bench/gpu.py)"
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA_VOCAB = 128256
# The published shapes (config.json of meta-llama/Llama-3.2-1B and Llama-3.1-8B).
MODELS = {
    "1b": {
        "name": "Llama 3.2 1B",
        "config": {
            "hidden_size": 2048,
            "intermediate_size": 8192,
            "num_hidden_layers": 16,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "tie_word_embeddings": True,
            "rope_theta": 500000.0,
        },
        "seq": 2048,
        "tokens_per_batch": 16384,
    },
    "8b": {
        "name": "Llama 3.1 8B",
        "config": {
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "tie_word_embeddings": False,
            "rope_theta": 500000.0,
        },
        "seq": 2048,
        "tokens_per_batch": 8192,
    },
    "tiny": {
        "name": "tiny (CPU smoke test)",
        "config": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "tie_word_embeddings": False,
        },
        "seq": 128,
        "tokens_per_batch": 512,
        "vocab": 1024,
    },
}
VARIANTS = {
    "plain": {},
    "default": {"maxTokensPerBatch": None, "batchSize": 8},  # the derived memory budget caps batchSize 8
    "bf16-adapters": {"lora": {"adapterPrecision": "compute", "dropout": 0.0}},
    "packed": {"packing": True},
    "grad-ckpt": {"gradientCheckpointing": True},
    "packed+grad-ckpt": {"packing": True, "gradientCheckpointing": True},
    "compiled": {"compile": True},  # torch.compile of the decoder layers: its warmup steps include the compile
}
COLUMNS = ["model", "variant", "attention", "tokens/s", "MFU", "peak memory", "padding", "checkpoint", "vs 100 steps"]


def build_model(workdir: Path, model: str) -> None:
    """make_model in a process of its own: the parent never holds the model, or any GPU memory, while the
    variants measure (the caching allocator would keep a built 8B model's 16 GB reserved)."""
    command = [sys.executable, __file__, "--build", model, "--workdir", str(workdir)]
    subprocess.run(command, check=True)


def make_model(out_dir: Path, spec: dict) -> Path:
    """A random Llama of spec's shape in bf16 (built on the GPU when there is one) plus the tiny tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune_trainer.tiny import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=spec.get("vocab", LLAMA_VOCAB),
        max_position_embeddings=max(spec["seq"], 2048),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **spec["config"],
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    del model
    return out_dir


def make_data(path: Path, seq: int, examples: int) -> Path:
    """Text examples of spelled-out numbers, about 150 to `seq` tokens each (truncated at seq)."""
    from finetune_trainer.tiny import spell_number

    rng = random.Random(0)
    lines = []
    most = max(4, seq // 7)  # a number and its spelling are about 7 tokens of the tiny BPE
    for _ in range(examples):
        numbers = [rng.randrange(1000) for _ in range(rng.randint(max(1, most // 12), most))]
        text = " ".join(f"{n} is {spell_number(n)}." for n in numbers)
        lines.append(json.dumps({"text": text}))
    path.write_text("\n".join(lines) + "\n")
    return path


def run_variant(workdir: Path, model: str, variant: str, warmup: int, steps: int) -> dict:
    """One variant in this process: train warmup + steps optimizer steps, time a checkpoint."""
    import torch

    from finetune_trainer.config import TrainerConfig
    from finetune_trainer.distributed import LaunchEnv
    from finetune_trainer.entrypoint import _quiet_libraries
    from finetune_trainer.loop import Recipe

    _quiet_libraries()
    spec = MODELS[model]
    training = dict(VARIANTS[variant])
    lora = {"r": 16, "alpha": 32, "dropout": 0.05, "targetModules": ALL_PROJECTIONS, **training.pop("lora", {})}
    log_every = max(1, min(warmup, steps)) if warmup else steps
    config = TrainerConfig.model_validate(
        {
            "model": str(workdir / model),
            "dataset": {"path": str(workdir / f"{model}.jsonl"), "format": "text"},
            "lora": lora,
            "training": {
                "maxSteps": warmup + steps,
                "maxTokensPerBatch": spec["tokens_per_batch"],
                "maxSeqLength": spec["seq"],
                "precision": "bf16" if torch.cuda.is_available() else "fp32",
                "learningRate": 1e-4,
                "warmupSteps": 0,
                "logEverySteps": log_every,
                **training,
            },
            "checkpoint": {"intervalSteps": 1_000_000, "keepLast": 1},
            "outputDir": tempfile.mkdtemp(prefix=f"{model}-{variant}-", dir=workdir),
        }
    )
    reported: dict[int, float] = {}  # step -> when its first progress report came (metric lines, checkpoints)
    recipe = Recipe(config, LaunchEnv(), progress_hooks=[lambda p: reported.setdefault(p.step, time.perf_counter())])
    stdout = io.StringIO()
    try:
        recipe.setup()
        with contextlib.redirect_stdout(stdout):
            recipe.train()  # ends with a checkpoint; one more of the same step is timed on its own
            started = time.perf_counter()
            recipe.save_checkpoint()
            checkpoint_seconds = time.perf_counter() - started
        summary = recipe.save_outputs()
    except torch.cuda.OutOfMemoryError as e:
        return {"model": model, "variant": variant, "error": f"out of memory ({str(e).splitlines()[0][:120]})"}
    finally:
        recipe.cleanup()
    lines = [json.loads(line) for line in stdout.getvalue().splitlines() if line.startswith("{")]
    measured = [line for line in lines if line["step"] > warmup] or lines
    first = warmup if warmup in reported else min(reported)
    seconds_per_step = (reported[warmup + steps] - reported[first]) / max(1, warmup + steps - first)

    def mean(key: str) -> float | None:
        values = [line[key] for line in measured if line.get(key) is not None]
        return sum(values) / len(values) if values else None

    return {
        "model": model,
        "variant": variant,
        "attention": summary.attn_implementation,
        "tokens_per_second": mean("tokens_per_second"),
        "mfu": mean("mfu"),
        "padding_fraction": mean("padding_fraction"),
        "peak_memory_gb": summary.peak_memory_bytes / 2**30 if summary.peak_memory_bytes else None,
        "checkpoint_seconds": checkpoint_seconds,
        "seconds_per_step": seconds_per_step,
    }


def trial(workdir: Path, model: str, variant: str, warmup: int, steps: int) -> dict:
    command = [sys.executable, __file__, "--worker", f"{model}:{variant}", "--workdir", str(workdir)]
    command += ["--warmup", str(warmup), "--steps", str(steps)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return {"model": model, "variant": variant, "error": f"exit {result.returncode}: {result.stderr[-400:]}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def render(rows: list[dict], command: str, warmup: int, steps: int) -> str:
    import torch
    import transformers

    def cell(row: dict) -> str:
        if "error" in row:
            return f"| {MODELS[row['model']]['name']} | {row['variant']} | {row['error']} |" + " |" * 6
        mfu = f"**{100 * row['mfu']:.1f}%**" if row["mfu"] is not None else "n/a (CPU)"
        memory = f"{row['peak_memory_gb']:.1f} GiB" if row["peak_memory_gb"] is not None else "n/a"
        overhead = row["checkpoint_seconds"] / (100 * row["seconds_per_step"])
        return (
            f"| {MODELS[row['model']]['name']} | {row['variant']} | {row['attention']} | "
            f"{row['tokens_per_second']:.0f} | {mfu} | {memory} | {100 * (row['padding_fraction'] or 0):.1f}% | "
            f"{row['checkpoint_seconds']:.2f} s | {100 * overhead:.2f}% |"
        )

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"no GPU ({cpu_name()})"
    header = "| " + " | ".join(COLUMNS) + " |\n" + "| --- " * len(COLUMNS) + "|"
    return f"""{SECTION}

Randomly initialised Llama models of the published shapes, LoRA r=16 (alpha 32, dropout 0.05) on all
attention and MLP projections, bf16 autocast over bf16 frozen weights, AdamW; synthetic text examples of
150-2048 tokens, maxSeqLength 2048, micro-batches of up to {MODELS["1b"]["tokens_per_batch"]} (1B) or
{MODELS["8b"]["tokens_per_batch"]} (8B) tokens (training.maxTokensPerBatch; the `default` variant: batchSize 8
capped by the budget the trainer derives from the GPU's memory), one process. {warmup} warm-up
steps, then {steps} measured. MFU: LoRA training FLOPs (4N per token plus attention) per second over the
GPU's dense bf16 peak (attention counted causal); goal 50%. Peak memory: torch's peak allocation in the
variant's own process. Checkpoint: one checkpoint's time (adapter, optimizer, RNG, manifest, fsync, rename)
against 100 steps, the default interval.

{header}
{chr(10).join(cell(row) for row in rows)}

- Date: {datetime.date.today().isoformat()}; {gpu}; torch {torch.__version__}, transformers
  {transformers.__version__}, Python {platform.python_version()}.
- Command: `{command}`
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="1b,8b", help="comma-separated: 1b, 8b (default both)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, default all")
    parser.add_argument("--tiny", action="store_true", help="the tiny model on CPU instead (a smoke test)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--record", type=Path, help="RESULTS.md to write the section into")
    parser.add_argument("--workdir", type=Path, help="keep the generated models here (default: a temporary dir)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--build", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.build:
        make_model(args.workdir / args.build, MODELS[args.build])
        return 0
    if args.worker:
        model, variant = args.worker.split(":")
        print(json.dumps(run_variant(args.workdir, model, variant, args.warmup, args.steps)))
        return 0
    models = ["tiny"] if args.tiny else args.models.split(",")
    variants = args.variants.split(",")
    unknown = [m for m in models if m not in MODELS] + [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown model or variant: {', '.join(unknown)}")
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-gpu-")))
        workdir.mkdir(parents=True, exist_ok=True)
        rows = []
        for model in models:
            spec = MODELS[model]
            if not (workdir / model / "config.json").exists():
                print(f"building {spec['name']} ...", file=sys.stderr)
                build_model(workdir, model)
            make_data(workdir / f"{model}.jsonl", spec["seq"], args.examples if not args.tiny else 64)
            for variant in variants:
                rows.append(trial(workdir, model, variant, args.warmup, args.steps))
                print(json.dumps(rows[-1]), file=sys.stderr)
    command = "python bench/gpu.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    section = render(rows, command, args.warmup, args.steps)
    print(section)
    if args.record:
        record_section(section, args.record)
    failed = [row for row in rows if "error" in row and "out of memory" not in row["error"]]
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
