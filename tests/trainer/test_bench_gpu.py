"""bench/gpu.py runs end to end on CPU with its tiny config (the GPU figures need a GPU machine)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.trainer.harness import REPO, TRAINER_SRC


def test_gpu_benchmark_runs_on_cpu_with_the_tiny_config(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## Other section\n\nkept\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TRAINER_SRC), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, str(REPO / "bench" / "gpu.py"), "--tiny", "--warmup", "1", "--steps", "2"]
    command += ["--variants", "plain,packed+grad-ckpt", "--record", str(results)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    text = results.read_text()
    assert "## Other section\n\nkept" in text and "## GPU training throughput (bench/gpu.py)" in text
    rows = re.findall(r"^\| tiny \(CPU smoke test\) \| (\S+) \| sdpa \| (\d+) \|", text, re.MULTILINE)
    assert [variant for variant, _ in rows] == ["plain", "packed+grad-ckpt"]
    assert all(int(tokens_per_second) > 0 for _, tokens_per_second in rows)
