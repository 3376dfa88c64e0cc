"""Changes no key can see are caught by the check of the hit (issue 18, item 3).

Two real processes share one cache; between them the data changes with the same file names, sizes and mtimes (or in
a JSON file the dataset opens by itself): 15% of the images replaced, a per-class gain, every image inverted, R and
B swapped, under a deterministic pipeline and under random ones. The second run must refit, warn with the test that
failed, and return the statistics of the data as it is now (computed straight from the files); unchanged data under
random pipelines (RandomResizedCrop, RandomGrayscale(p=0.1)) must stay a verified hit.
"""

import json
import os
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from datasets_for_tests import run_worker

TESTS = Path(__file__).parent
CHANGED = {  # scenario -> what the check must name
    "replaced_15_percent": "identical", "json_class_gain": "identical",
    "inverted": "identical", "swapped": "identical",
    "inverted_crop": "noise", "swapped_crop": "noise",
}
UNCHANGED = ["unchanged_crop", "unchanged_gray"]
SCENARIOS = [*CHANGED, *UNCHANGED]


def write_bmp(path: Path, pixels: np.ndarray) -> None:
    """Write an uncompressed BMP (its size depends only on the image's size) and keep the file's old mtime."""
    stat = path.stat() if path.exists() else None
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(pixels.astype(np.uint8)).save(path, format="BMP")
    if stat is not None:
        assert path.stat().st_size == stat.st_size
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def colours(n: int, size: int, seed: int) -> np.ndarray:
    """``n`` images, each one random colour with a little noise: crops of one image differ far less than images."""
    rng = np.random.default_rng(seed)
    base = rng.integers(20, 236, (n, 1, 1, 3))
    return np.clip(base + rng.integers(-12, 13, (n, size, size, 3)), 0, 255)


def make_work(work: Path) -> None:
    for i, image in enumerate(colours(300, 8, seed=1)):
        write_bmp(work / "replaced_15_percent" / "c" / f"{i:03d}.bmp", image)
    for name in ["inverted", "swapped", "inverted_crop", "swapped_crop", *UNCHANGED]:
        for i, image in enumerate(colours(60, 16, seed=2)):
            write_bmp(work / name / f"c{i % 3}" / f"{i:02d}.bmp", image)
    write_json(work / "json_class_gain" / "gains.json", [1.0, 1.0, 1.0, 1.0])


def write_json(path: Path, gains: list[float]) -> None:
    stat = path.stat() if path.exists() else None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"gains": gains}))
    if stat is not None:
        assert path.stat().st_size == stat.st_size
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def change(work: Path) -> None:
    """The changes of issue 18 that keep every name, size and mtime."""
    replaced = colours(300, 8, seed=3)
    for i in range(0, 300, 7)[:45]:  # 15% of the images, spread over the folder
        write_bmp(work / "replaced_15_percent" / "c" / f"{i:03d}.bmp", replaced[i])
    write_json(work / "json_class_gain" / "gains.json", [1.0, 1.3, 1.0, 1.0])  # class 1: 25% of the images
    for name, edit in (("inverted", lambda x: 255 - x), ("swapped", lambda x: x[..., ::-1])):
        for folder in (name, f"{name}_crop"):
            for path in sorted((work / folder).rglob("*.bmp")):
                write_bmp(path, edit(np.asarray(PIL.Image.open(path).convert("RGB")).astype(np.int64)))


def run(cache: Path, work: Path) -> dict:
    return run_worker(TESTS / "_change_worker.py", str(cache), str(work), *SCENARIOS)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    make_work(work)
    cache = work / "cache"
    first = run(cache, work)
    change(work)
    return first, run(cache, work), run(cache, work)


def exact(found: dict) -> bool:
    return (found["mean"] == pytest.approx(found["true_mean"], rel=1e-6)
            and found["std"] == pytest.approx(found["true_std"], rel=1e-6))


@pytest.mark.parametrize("name", SCENARIOS)
def test_the_first_run_fits_and_deterministic_pipelines_give_the_exact_statistics(runs, name):
    found = runs[0][name]
    assert found["source"] == "pass"
    if not name.endswith(("_crop", "_gray")):
        assert exact(found)


@pytest.mark.parametrize("name", list(CHANGED))
def test_a_change_no_key_sees_fails_the_check_and_refits(runs, name):
    first, second, _ = runs
    a, b = first[name], second[name]
    assert b["key"] == a["key"]  # the premise: same names, sizes, mtimes; the key cannot see it
    assert b["source"] == "pass" and b["verified"] is False and CHANGED[name] in b["failed"], b
    assert any("does not match the data" in w and f"the {CHANGED[name]} test failed" in w for w in b["warnings"])
    assert b["true_mean"] != pytest.approx(a["true_mean"], rel=1e-3)
    if name.endswith("_crop"):  # a random crop of the images as they are now
        assert b["mean"] == pytest.approx(b["true_mean"], abs=0.02) and b["std"] == pytest.approx(b["true_std"], rel=0.1)
    else:
        assert exact(b)


@pytest.mark.parametrize("name", UNCHANGED)
def test_unchanged_data_under_a_random_pipeline_is_a_verified_hit(runs, name):
    first, second, _ = runs
    assert second[name]["source"] == "cache" and second[name]["verified"] is True
    assert second[name]["mean"] == first[name]["mean"] and not second[name]["warnings"]
    assert 0 < second[name]["read"] <= 64


@pytest.mark.parametrize("name", SCENARIOS)
def test_the_third_run_hits_the_entry_the_second_wrote(runs, name):
    _, second, third = runs
    assert third[name]["source"] == "cache" and third[name]["verified"] is True
    assert third[name]["mean"] == second[name]["mean"] and not third[name]["warnings"]
