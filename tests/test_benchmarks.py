"""Smoke tests of the benchmarks: ``bench_fit.py --quick`` and ``bench_verify.py --quick`` run and print their tables.

No timing is asserted (the machine may be busy); only that every section ran and produced exactly its
rows, that the fit's statistics were exact against the float64 truth (tests/reference.py), that the
cache hit gave the fitted numbers, and (``bench_verify.py``, the simulated hits only) that unchanged data
with a deterministic pipeline never failed verification and a shift of half a std failed every hit. The
default run covers the in-memory uint8 workload at the smallest sizes; the slow
run all four at the sizes of ``--quick --scale 0.2``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_fit.py"
ALL_WORKLOADS = ("uint8", "uint8 batches", "FakeData", "ImageFolder")
METHODS = ("floor", "fit", "BatchNorm2d(0.1)", "forum mean/std", "stack+std_mean", "cache hit")


def quick_run(tmp: Path, workloads: tuple[str, ...], scale: float) -> tuple[str, dict]:
    out_json = tmp / "results.json"
    env = dict(os.environ, PYTHONWARNINGS="ignore", TORCHNORMFIT_CACHE=str(tmp / "default-cache"))
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--scale", str(scale), "--workloads", ",".join(workloads),
         "--json", str(out_json), "--tmpdir", str(tmp)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, f"bench_fit.py --quick failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout, json.loads(out_json.read_text())


def check_tables(out: str, workloads: tuple[str, ...]) -> None:
    for heading in ("## Fit pass vs. floor and recipes", "## What a cache hit costs", "## The accumulator alone",
                    "## Peak RSS when the dataset grows 10x", "## Defaults: batch_size x num_workers",
                    "## 1 vs 2 torch.distributed ranks", "## Targets (issue 4)"):
        assert heading in out
    assert "| workload | method | time s | x floor |" in out
    for workload in workloads:
        for method in METHODS:
            assert f"| {workload} | {method} |" in out


def check_results(results: dict, workloads: tuple[str, ...]) -> None:
    rows = results["fit"]["table"]
    assert list(results["fit"]["specs"]) == list(workloads)
    assert [(row["workload"], row["method"]) for row in rows] == [(w, m) for w in workloads for m in METHODS]
    assert not [row for row in rows if "error" in row]
    for row in rows:
        if row["method"] == "fit":
            assert row["mean_err"] <= 1e-6 and row["std_err"] <= 1e-6, row
        if row["method"] == "cache hit":
            assert row["reads_in_main"] == 0, row
    assert "error" not in results["accumulator"]
    assert all(v["exact"] for v in results["accumulator"]["exactness"].values())
    assert results["rss"] and not [row for row in results["rss"] if "error" in row]
    assert results["ranks"].get("same_on_all_ranks") is True
    assert results["defaults"]["table"]
    assert [row["workload"] for row in results["hit"]] == list(workloads)
    assert all(row["reads_in_main"] == 0 for row in results["hit"])


@pytest.fixture(scope="module")
def quick_workloads(tmp_path_factory):
    workloads = ("uint8",)  # every workload, ImageFolder included, under slow
    return quick_run(tmp_path_factory.mktemp("bench"), workloads, scale=0.05), workloads


def test_prints_every_table(quick_workloads):
    (out, _), workloads = quick_workloads
    check_tables(out, workloads)


def test_every_measurement_succeeded_and_the_fit_is_exact(quick_workloads):
    (_, results), workloads = quick_workloads
    check_results(results, workloads)


@pytest.mark.slow
def test_every_workload_at_quick_sizes(tmp_path):
    out, results = quick_run(tmp_path, ALL_WORKLOADS, scale=0.2)
    check_tables(out, ALL_WORKLOADS)
    check_results(results, ALL_WORKLOADS)


def test_cache_benchmark_runs_and_the_foreign_file_is_read_only_as_far_as_needed(tmp_path):
    """``benchmarks/bench_cache.py --quick``: every table, and the foreign file refused after a few KB."""
    out_json = tmp_path / "cache.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH.with_name("bench_cache.py")), "--quick", "--rounds", "3", "--json", str(out_json),
         "--tmpdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    assert proc.returncode == 0, f"bench_cache.py --quick failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    for heading in ("## Save and hit vs entries", "## Listing the folder", "## A foreign HDF5 file refused"):
        assert heading in proc.stdout
    results = json.loads(out_json.read_text())
    assert [row["entries"] for row in results["entries"]] == [1, 10, 100]
    assert [row["bytes"] > 2**26 for row in results["foreign"]] == [False, True]
    assert all(row["refused"] and row["bytes_read"] < 2**20 for row in results["foreign"])
    assert [row["entries"] for row in results["listing"]] == [1, 10, 100]


VERIFY_BENCH = BENCH.parent / "bench_verify.py"


@pytest.fixture(scope="module")
def verify_run(tmp_path_factory):
    out_json = tmp_path_factory.mktemp("bench_verify") / "results.json"
    proc = subprocess.run(
        [sys.executable, str(VERIFY_BENCH), "--quick", "--sections", "sim", "--json", str(out_json)],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    assert proc.returncode == 0, f"bench_verify.py --quick failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout, json.loads(out_json.read_text())


def test_verify_bench_prints_its_tables(verify_run):
    out, results = verify_run
    for heading in ("## False alarms on unchanged data", "## Detection: fraction of", "## Issue 10's requirements"):
        assert heading in out
    kinds = {(kind["data"], kind["pipeline"]) for kind in results["sim"]}
    assert {("photos", "deterministic"), ("photos", "RandomResizedCrop"), ("10% textured, 90% flat", "RandomResizedCrop"),
            ("1% textured, 99% flat", "RandomResizedCrop"), ("class-sorted", "RandomResizedCrop")} <= kinds
    for kind in results["sim"]:
        assert set(kind["false_alarms"]) == set(kind["detection"]) == {"64", "16"}
        for counts in kind["false_alarms"].values():
            assert counts["hits"] == 200 and 0 <= counts["failed"] <= counts["hits"]
            assert counts["failed"] == counts["failed_by_t"] + counts["failed_by_sign_only"]
            assert counts["upper95"] > counts["failed"] / counts["hits"]
    photos = next(kind for kind in results["sim"] if kind["pipeline"] == "deterministic")
    assert photos["false_alarms"]["64"]["upper95"] == pytest.approx(1 - 0.05 ** (1 / 200))  # 0 in 200: ~3/200


def test_verify_bench_unchanged_deterministic_data_never_fails_and_a_half_std_shift_always_does(verify_run):
    _, results = verify_run
    deterministic = [kind for kind in results["sim"] if kind["pipeline"] == "deterministic"]
    assert deterministic
    for kind in deterministic:
        assert all(counts["failed"] == 0 for counts in kind["false_alarms"].values()), kind
        assert all(rates["shift 0.5 std"] == 1.0 and rates["std x1.25"] == 1.0 for rates in kind["detection"].values())
    for kind in results["sim"]:
        assert kind["detection"]["64"]["shift 0.5 std"] == 1.0, kind
def test_stream_benchmark_quick_run_compares_the_fit_with_a_plain_pass(tmp_path):
    pytest.importorskip("webdataset")
    out_json = tmp_path / "streams.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH.parent / "bench_streams.py"), "--quick", "--json", str(out_json)],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(out_json.read_text())
    assert [row["workload"].split()[0] for row in rows] == ["JPEG", "float32"]
    assert all(row["samples"] >= 16 and row["ratio"] > 0 for row in rows)
    assert "| fit / plain (median of rounds) |" in proc.stdout


def test_key_benchmark_runs_and_prints_its_ratios(tmp_path):
    """``benchmarks/bench_key.py`` at 600 files: the key of an absolute and a relative root, against the listing."""
    proc = subprocess.run([sys.executable, str(BENCH.with_name("bench_key.py")), "--files", "600", "--classes", "6",
                           "--rounds", "1"], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "ImageFolder of 600 files in 6 classes" in proc.stdout and "after / listing" in proc.stdout
