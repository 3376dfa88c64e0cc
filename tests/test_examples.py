"""What a reader runs first: the docstring examples, examples/quickstart.py and examples/bn_vs_exact.py."""

import doctest
import importlib
import os
import pkgutil
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reference import truth
from torchvision.datasets import FakeData
from torchvision.transforms import v2

import torchnormfit

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted(info.name for info in pkgutil.walk_packages(torchnormfit.__path__, "torchnormfit."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, capsys):
    module = importlib.import_module(name)
    failed, attempted = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert failed == 0, capsys.readouterr().out


def test_the_modules_with_examples_are_among_those_run():
    """The examples are found where the docstrings hold them (a doctest that finds nothing passes too)."""
    finder = doctest.DocTestFinder()
    with_examples = {name for name in MODULES
                     if any(test.examples for test in finder.find(importlib.import_module(name)))}
    assert {"torchnormfit.accumulator", "torchnormfit.passes", "torchnormfit.passes.mapped",
            "torchnormfit.passes.streamed", "torchnormfit.stats",
            "torchnormfit.transform"} <= with_examples


def test_the_readme_is_for_users_and_short():
    """At most 200 lines; how things work, the numbers and their history live in docs/."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert "issue " not in readme.lower()


def run_quickstart(cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, TORCHNORMFIT_CACHE=str(cache))
    return subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--images", "200"],
                          capture_output=True, text=True, timeout=300, env=env, check=True)


def test_quickstart_fits_then_hits_the_cache(tmp_path):
    """The README's quickstart, at 200 images: a pass that writes the cache, then a hit with the same numbers."""
    first, second = run_quickstart(tmp_path / "cache"), run_quickstart(tmp_path / "cache")
    assert "torchnormfit: fitting FakeData: 200 samples" in first.stderr and "torchnormfit: cached" in first.stderr
    assert "torchnormfit: cache hit:" in second.stderr and "torchnormfit: fitting" not in second.stderr
    numbers = [re.search(r"FitNormalize\(mean=\[(.*)\], std=\[(.*)\], inplace=False\)", run.stdout) for run in (first, second)]
    assert numbers[0].groups() == numbers[1].groups()
    images = FakeData(size=200, image_size=(3, 32, 32), transform=v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]))
    want = truth([images[i][0] for i in range(200)])
    for got, field in zip(numbers[0].groups(), ("mean", "std")):
        torch.testing.assert_close(torch.tensor([float(v) for v in got.split(", ")], dtype=torch.float64),
                                   want[field], rtol=1e-6, atol=0)
    assert re.search(r"dataset\[0\] is now normalized: mean -?0\.\d+, std [01]\.\d+", second.stdout)


def run_bn_vs_exact(monkeypatch, capsys, *args: str) -> tuple[dict[str, tuple[float, float]], str]:
    """Run examples/bn_vs_exact.py in this process: its rows as {method: (mean error, std error)}, its output."""
    monkeypatch.setattr(sys, "argv", ["bn_vs_exact.py", *args])
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(ROOT / "examples" / "bn_vs_exact.py"), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "reproduces stock BatchNorm2d(momentum=0.1) bit for bit: True" in out
    rows = re.findall(r"^(BatchNorm.*?) +(\d\.\d\de[-+]\d+) +(\d\.\d\de[-+]\d+)$", out, re.M)
    return {name: (float(mean), float(std)) for name, mean, std in rows}, out


def test_bn_vs_exact_shows_what_the_docs_say(monkeypatch, capsys):
    """At 500 batches: the stock recipe is far off, the cumulative one misses the std, the accumulator is exact."""
    rows, _ = run_bn_vs_exact(monkeypatch, capsys, "--batches", "500")
    assert rows["BatchNorm2d(momentum=0.1)"][0] > 0.1 and rows["BatchNorm2d(momentum=0.1)"][1] > 0.1
    assert rows["BatchNorm2d(momentum=None)"][0] < 1e-5 and rows["BatchNorm2d(momentum=None)"][1] > 0.1
    assert max(rows["BatchNormAccumulator (exact, float64 state)"]) < 1e-9
    assert max(rows["BatchNormAccumulator running_mean/var"]) < 1e-6


@pytest.mark.slow
def test_bn_vs_exact_prints_the_documented_output(monkeypatch, capsys):
    """At the default 2000 batches, the block in docs/how-it-works.md: the same lines (the exact row: both below
    1e-9)."""
    _, out = run_bn_vs_exact(monkeypatch, capsys)
    readme = (ROOT / "docs" / "how-it-works.md").read_text()
    block = readme.split("$ python examples/bn_vs_exact.py\n", 1)[1].split("```", 1)[0]
    for line in block.splitlines():
        if line.startswith("BatchNormAccumulator (exact"):
            got = next(row for row in out.splitlines() if row.startswith("BatchNormAccumulator (exact"))
            assert max(map(float, line.split()[-2:])) < 1e-9 and max(map(float, got.split()[-2:])) < 1e-9
        elif line:
            assert line in out.splitlines(), line
