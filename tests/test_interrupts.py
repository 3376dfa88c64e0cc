"""Ctrl-C and concurrent runs, with real processes: nothing half-written, nothing left running."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from torchnormfit import list_entries

TESTS = Path(__file__).parent

SLOW_FIT = """
import sys, time
sys.path.insert(0, {tests!r})
from datasets_for_tests import CountingDataset
from torchnormfit import FitNormalize

class Slow(CountingDataset):
    def __getitem__(self, index):
        time.sleep(0.01)
        return super().__getitem__(index)

norm = FitNormalize(cache={cache!r})
print("started", flush=True)
norm.fit(Slow(n=2000, transform=norm), num_workers={workers}, batch_size=8, progress=False)
print("finished", flush=True)
"""


def processes_in_group(pgid):
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


@pytest.mark.parametrize(("seed", "workers"), [
    (0, 0), (1, 2),  # the default run: each number of workers once
    pytest.param(1, 0, marks=pytest.mark.slow), pytest.param(0, 2, marks=pytest.mark.slow),
])
def test_ctrl_c_at_a_random_moment_writes_nothing_and_leaves_no_worker(tmp_path, workers, seed):
    cache = tmp_path / "cache"
    child = subprocess.Popen(
        [sys.executable, "-c", SLOW_FIT.format(tests=str(TESTS), cache=str(cache), workers=workers)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    assert child.stdout.readline().strip() == "started"
    time.sleep(random.Random(seed).uniform(0.3, 1.5))
    os.killpg(child.pid, signal.SIGINT)  # what a terminal sends to the foreground job on Ctrl-C
    _, stderr = child.communicate(timeout=60)
    assert child.returncode != 0 and "KeyboardInterrupt" in stderr
    assert not cache.exists()
    deadline = time.monotonic() + 10
    while processes_in_group(child.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_in_group(child.pid) == []


SAME_KEY_FIT = """
import os, sys, json, time
sys.path.insert(0, {tests!r})
from datasets_for_tests import CountingDataset
from torchnormfit import FitNormalize

class Together(CountingDataset):
    \"\"\"Sample 0 (read first) waits until all {parties} processes are reading: their passes overlap.\"\"\"
    def __getitem__(self, index):
        if index == 0:
            open(os.path.join({barrier!r}, str(os.getpid())), "w").close()
            deadline = time.monotonic() + 120
            while len(os.listdir({barrier!r})) < {parties}:
                if time.monotonic() > deadline:
                    raise TimeoutError("the other processes never started their pass")
                time.sleep(0.01)
        return super().__getitem__(index)

norm = FitNormalize(cache={cache!r})
norm.fit(Together(n=200, transform=norm), num_workers=0, progress=False)
print(json.dumps({{"mean": norm.mean, "std": norm.std}}))
"""


def test_four_processes_fitting_the_same_key_agree_and_leave_one_valid_entry(tmp_path):
    """All four are inside their pass at once (a file barrier on the first sample), then all write the key."""
    cache, barrier = tmp_path / "cache", tmp_path / "barrier"
    barrier.mkdir()
    code = SAME_KEY_FIT.format(tests=str(TESTS), cache=str(cache), barrier=str(barrier), parties=4)
    children = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    results = [json.loads(child.communicate(timeout=300)[0]) for child in children]
    assert all(child.returncode == 0 for child in children)
    assert len(os.listdir(barrier)) == 4  # each did its own pass: none found the entry in the cache
    assert all(result == results[0] for result in results)
    entries = list_entries(cache)
    assert len(entries) == 1 and entries[0].stats.mean.tolist() == results[0]["mean"]
