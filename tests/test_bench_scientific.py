"""Smoke test of benchmarks/bench_scientific.py --quick: its sections run and report their ratios (no timing asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_scientific.py"


def test_the_quick_benchmark_reports_every_ratio(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--sections", "centring", "uint16", "--json",
                           str(out)], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())
    assert set(results["centring"]) == {"cifar-like", "narrow", "uniform"}
    assert all(ratio > 1 for ratio in results["centring"].values())  # nothing is cheaper than one sum
    assert results["uint16"]["ignore+clip_x"] > 0
    assert "centring" in proc.stdout and "uint16" in proc.stdout and "target <=" in proc.stdout
