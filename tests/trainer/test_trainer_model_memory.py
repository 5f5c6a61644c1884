"""Host memory of several trainer processes loading one base model: its memory-mapped weights are shared.

Each process loads the model as the trainer does (model.load_model) and reads every weight; the processes'
summed PSS (proportional set size: a page shared by k processes counts 1/k in each) must grow by far less
than one copy of the weights per process, as it would if each process held its own CPU copy.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import psutil
import pytest

from finetune_trainer.tiny import make_tiny_model
from tests.trainer.harness import TRAINER_SRC, write_config

log = logging.getLogger(__name__)

PROCESSES = 4

CHILD = """
import sys
import torch
from peft import get_peft_model  # imports and a first op before the baseline, so they are not counted
from transformers import AutoModelForCausalLM
from finetune_trainer.config import load_trainer_config
from finetune_trainer.model import load_model, load_tokenizer, resolve_precision

torch.ones(512, 512).sum()
config = load_trainer_config(sys.argv[1])
tokenizer = load_tokenizer(config.model)
print("ready", flush=True)
sys.stdin.readline()
cpu = torch.device("cpu")
model = load_model(config, tokenizer, resolve_precision("fp32", cpu), cpu, None)
with torch.no_grad():
    touched = sum(float(p.sum()) for p in model.parameters())  # every weight page read, as training does
print("loaded", flush=True)
sys.stdin.read()
"""


def summed_pss(processes: list[subprocess.Popen]) -> int:
    return sum(psutil.Process(p.pid).memory_full_info().pss for p in processes)


def expect_line(process: subprocess.Popen, word: str) -> None:
    line = process.stdout.readline().strip()  # blocks until the child says it (or exits: then it is "")
    assert line == word, f"child {process.pid} said {line!r}, exit code {process.poll()}"


@pytest.mark.skipif(not hasattr(psutil.Process(), "memory_full_info"), reason="needs PSS (/proc/PID/smaps)")
def test_processes_share_one_copy_of_the_base_weights(tmp_path, tiny_data):
    model = make_tiny_model(tmp_path / "model", hidden_size=256, num_layers=2, pad_vocab_to=128_000)
    weights = (model / "model.safetensors").stat().st_size
    config = write_config(tmp_path / "config.yaml", model, tiny_data, tmp_path / "out")
    env = {**os.environ, "PYTHONPATH": str(TRAINER_SRC), "OMP_NUM_THREADS": "1"}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(config)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(PROCESSES)
    ]
    try:
        for process in processes:
            expect_line(process, "ready")
        before = summed_pss(processes)
        for process in processes:
            process.stdin.write("go\n")
            process.stdin.flush()
        for process in processes:
            expect_line(process, "loaded")
        growth = summed_pss(processes) - before
    finally:
        for process in processes:
            process.stdin.close()
        for process in processes:
            process.wait(timeout=60)
    log.warning(
        "%d processes: summed PSS grew by %.0f MB for %.0f MB of weights (%.2f copies)",
        PROCESSES,
        growth / 1e6,
        weights / 1e6,
        growth / weights,
    )
    assert growth < PROCESSES * weights / 2, f"{growth / weights:.2f} copies of the weights for {PROCESSES} processes"
    assert growth > weights / 2, "the weights were never read: the measurement measures nothing"
