"""The benchmark scripts run at toy size, so they cannot rot."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import REPO


def test_overhead_bench_runs_at_toy_size(tiny_model):
    proc = subprocess.run([sys.executable, "bench/overhead.py", "--model", str(tiny_model), "--steps", "2",
                           "--warmup", "1", "--batch-size", "2", "--seq-len", "16"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("glora/lora", "adalora/lora", "harness/bare"):
        assert re.search(rf"^{name} step-time ratio: \d+\.\d+$", proc.stdout, re.M), proc.stdout
    assert "GLoRA rebuild pause" in proc.stdout and "bare PEFT loop" in proc.stdout
