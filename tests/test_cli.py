"""The command line, run as a user runs it: ``python -m torchnormfit ...`` in a subprocess.

Image folders are written with PIL (mixed sizes and formats, one corrupt file;
the ``tree`` fixture of test_folder.py), and every printed statistic is checked
against a float64 computation over the same decoded pixels. A fresh fit, a
cache hit, a failure (exit 1) and a usage error (exit 2) run as subprocesses;
the other checks call ``cli.main`` in this process, to keep the module fast
(each subprocess pays for importing torch).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
import PIL.Image
import pytest
import torch
from _cache_worker import entry_attrs, entry_file, make_stats
from reference import truth
from test_folder import random_image, tree, write_image, write_png16  # noqa: F401 (tree: a fixture)

from torchnormfit import list_entries
from torchnormfit.cache import write_entry
from torchnormfit.cli import main
from torchnormfit.passes import subset_indices

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-6
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

try:
    import matplotlib  # noqa: F401

    HAS_MATPLOTLIB = True
except ImportError:
    HAS_MATPLOTLIB = False


# --- helpers -----------------------------------------------------------------------------------


def run(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    """``python -m torchnormfit ARGS`` as a user runs it; the user's own cache is never touched."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["TORCHNORMFIT_CACHE"] = str(tmp / "default-cache-must-stay-unused")
    return subprocess.run(
        [sys.executable, "-m", "torchnormfit", *map(str, args)],
        capture_output=True, text=True, env=env, timeout=120,
    )


def call(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """``cli.main(ARGS)`` in this process: (exit code, stdout, stderr); argparse's exits become codes."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def reference(paths: list[Path], mode: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Float64 mean, population std and pixel count (tests/reference.py) over the pixels of ``paths`` decoded by PIL."""
    images = []
    for path in paths:
        with PIL.Image.open(path) as image:
            array = np.asarray(image.convert(mode), dtype=np.float64) / 255.0
        images.append(torch.from_numpy(array.reshape(*array.shape[:2], -1)).permute(2, 0, 1))
    want = truth(images)
    return want["mean"].numpy(), want["std"].numpy(), int(want["count"][0])


def stats_rows(stdout: str, names: list[str]) -> dict[str, list[float]]:
    """The table of a human-readable report: channel name -> its numbers."""
    rows = {}
    for line in stdout.splitlines():
        cells = line.split()
        if cells and cells[0] in names and len(cells) >= 3:
            rows[cells[0]] = [float(c) for c in cells[1:] if c not in {"±"}]
    return rows


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted(tree, tmp_path_factory) -> dict:
    """One fresh fit (human output, 2 workers) and the same fit again as JSON (a cache hit)."""
    tmp = tmp_path_factory.mktemp("fitted")
    cache = tmp / "cache"
    common = [tree["root"], "--cache", cache, "--skip-bad", "--no-progress"]
    human = run("fit", *common, "--workers", 2, tmp=tmp)
    again = run("fit", *common, "--workers", 0, "--json", tmp=tmp)
    assert human.returncode == 0, human.stderr
    assert again.returncode == 0, again.stderr
    return {"cache": cache, "human": human, "json": json.loads(again.stdout), "tmp": tmp}


# --- fit ---------------------------------------------------------------------------------------


def test_corrupt_file_fails_with_its_name_and_writes_nothing(tree, tmp_path):
    result = run("fit", tree["root"], "--cache", tmp_path / "cache", "--workers", 2, tmp=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert str(tree["bad"]) in result.stderr and "--skip-bad" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "cache").exists()


def test_printed_stats_equal_float64_over_the_same_pixels(tree, fitted):
    mean, std, count = reference(tree["good"], "RGB")
    out = fitted["human"].stdout
    rows = stats_rows(out, ["R", "G", "B"])
    for c, name in enumerate("RGB"):
        assert rows[name][0] == pytest.approx(mean[c], abs=TOLERANCE)
        assert rows[name][1] == pytest.approx(std[c], abs=TOLERANCE)
    assert f"pixels per channel: {count:,}" in out
    assert "images: 7;" in out and "1 unreadable file(s) skipped" in out
    assert "transforms.Normalize(mean=[" in out and "fitted and saved" in out
    assert str(tree["bad"]) in fitted["human"].stderr  # the skipped file is named


def test_json_output_and_cache_hit(tree, fitted):
    mean, std, count = reference(tree["good"], "RGB")
    report = fitted["json"]
    assert report["cached"] is True  # the second run found the unreadable file again, then the cached entry
    assert report["channels"] == ["R", "G", "B"]
    np.testing.assert_allclose(report["mean"], mean, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(report["std"], std, rtol=0, atol=TOLERANCE)
    assert report["pixels_per_channel"] == count
    assert (report["num_samples"], report["skipped"], report["subset"]) == (7, 1, None)
    assert report["normalize"].startswith("transforms.Normalize(mean=[")


@pytest.mark.filterwarnings("default::torchnormfit.CacheWarning")
def test_the_cache_line_says_loaded_saved_or_not_saved_and_not_saved_exits_1(tree, tmp_path, capsys):
    outcomes = []
    for cache, extra, want in [(tmp_path / "cache", [], 0), (tmp_path / "cache", [], 0),
                               (tmp_path / "cache", ["--refit"], 0), ("/proc/torchnormfit-cache", [], 1)]:
        code, out, err = call(capsys, "fit", tree["root"] / "cat", "--cache", cache, "--workers", 0,
                              "--no-progress", *extra)
        assert code == want, err
        outcomes.append(out.splitlines()[-1].split(" (", 1)[1])
    assert outcomes == ["fitted and saved)",
                        "loaded from the cache; --refit fits again; 3 images checked against it: match)",
                        "fitted and saved)", "fitted, NOT saved)"]
    assert "No such file or directory" in err and "error: the statistics were fitted but not saved" in err


def test_a_file_that_is_not_an_entry_file_is_refused_and_left_byte_for_byte(tree, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label\ncat/1.png,0\n")
    result = run("fit", tree["root"] / "cat", "--cache", labels, "--workers", 0, "--no-progress", tmp=tmp_path)
    assert result.returncode == 1 and "not a torchnormfit entry file" in result.stderr
    assert "fitted, NOT saved" in result.stdout and "Traceback" not in result.stderr
    assert labels.read_text() == "file,label\ncat/1.png,0\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.csv"]


def test_help_ls_and_export_import_no_torch(fitted, tmp_path):
    """``torchnormfit --help`` (the console script's function), ``python -m torchnormfit --help``, ``ls`` and
    ``export -o`` in fresh interpreters: torch is never imported."""
    key, cache = fitted["json"]["key"], fitted["cache"]
    script = ("import runpy, sys; sys.argv = ['torchnormfit', *sys.argv[2:]]\n"
              "try:\n"
              "    runpy.run_module('torchnormfit', run_name='__main__') if sys.argv[1] == 'm' else "
              "__import__('torchnormfit.cli').cli.main()\n"
              "except SystemExit as exit:\n"
              "    assert exit.code in (0, None), exit.code\n"
              "assert 'torch' not in sys.modules, 'torch was imported'\n")
    for how, *args in [("m", "--help"), ("script", "--help"), ("m", "ls", "--cache", cache),
                       ("script", "ls", cache, "--json"), ("m", "export", key, "--cache", cache, "-o", tmp_path / "x.h5")]:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        result = subprocess.run([sys.executable, "-c", script, how, *map(str, args)], capture_output=True,
                                text=True, env=env, timeout=120)
        assert result.returncode == 0, (args, result.stderr[-2000:])
        assert ("usage: torchnormfit" in result.stdout) == (args[0] == "--help")
    assert (tmp_path / "x.h5").is_file()


def test_flat_tree_at_any_depth_with_mode_L(tmp_path, capsys):
    rng = np.random.default_rng(1)
    root = tmp_path / "flat"
    paths = [
        write_image(root / "top.png", random_image(rng, (7, 9), 3, 0.3)),
        write_image(root / "a" / "b" / "c" / "deep.JPG", random_image(rng, (16, 8), 3, 0.7)),
        write_image(root / "a" / "mid.tif", random_image(rng, (5, 5), 1, 0.5)),
    ]
    code, out, err = call(capsys, "fit", root, "--mode", "L", "--cache", tmp_path / "cache", "--workers", 0, "--json")
    assert code == 0, err
    report = json.loads(out)
    mean, std, count = reference(sorted(paths), "L")
    assert report["channels"] == ["L"] and "flat" in report["source"]
    np.testing.assert_allclose(report["mean"], mean, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(report["std"], std, rtol=0, atol=TOLERANCE)
    assert (report["pixels_per_channel"], report["num_samples"]) == (count, 3)


def test_resize_and_center_crop_shape_every_image(tree, tmp_path, capsys):
    code, out, err = call(capsys, "fit", tree["root"], "--skip-bad", "--resize", 12, "--center-crop", 10,
                          "--cache", tmp_path / "cache", "--workers", 0, "--json", "--no-progress")
    assert code == 0, err
    report = json.loads(out)
    assert report["pixels_per_channel"] == 7 * 10 * 10
    assert all(0.0 <= v <= 1.0 for v in report["min"] + report["max"])


def test_missing_torchvision_dataset_is_a_clear_failure(tmp_path, capsys):
    code, _, err = call(capsys, "fit", "--dataset", "CIFAR10", "--root", tmp_path / "nothing", "--cache", tmp_path / "cache")
    assert code == 1
    assert "CIFAR10" in err and "download=True" in err
    assert "Traceback" not in err


def test_torchvision_dataset_from_local_files(tmp_path, capsys):
    """MNIST in its own file format, written here: the --dataset path end to end, nothing downloaded."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.random.default_rng(2).integers(0, 256, size=(12, 28, 28), dtype=np.uint8)
    for prefix in ("train", "t10k"):
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">iiii", 2051, 12, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">ii", 2049, 12) + bytes(12))
    code, out, err = call(capsys, "fit", "--dataset", "mnist", "--root", tmp_path, "--split", "test",
                          "--cache", tmp_path / "cache", "--workers", 0, "--json", "--no-progress")
    assert code == 0, err
    report = json.loads(out)
    pixels = images.astype(np.float64) / 255
    assert report["mean"][0] == pytest.approx(pixels.mean(), abs=TOLERANCE)
    assert report["std"][0] == pytest.approx(pixels.std(), abs=TOLERANCE)
    assert report["pixels_per_channel"] == pixels.size


def test_subset_standard_error_covers_the_full_pass(tmp_path, capsys):
    rng = np.random.default_rng(3)
    root = tmp_path / "many"
    paths = [write_image(root / f"{i:03d}.png", random_image(rng, (8, 6 + i % 5), 3, rng.uniform(0.1, 0.9)))
             for i in range(90)]
    code, out, err = call(capsys, "fit", root, "--max-samples", 40, "--seed", 7, "--cache", tmp_path / "cache",
                          "--workers", 0, "--json")
    assert code == 0, err
    report = json.loads(out)
    subset = report["subset"]
    assert (report["num_samples"], subset["max_samples"], subset["seed"], subset["population"]) == (40, 40, 7, 90)
    full_mean, full_std, _ = reference(paths, "RGB")
    for c in range(3):
        assert 0 < subset["mean_se"][c] < 0.1 and 0 < subset["std_se"][c] < 0.1
        assert abs(report["mean"][c] - full_mean[c]) <= 3 * subset["mean_se"][c]
        assert abs(report["std"][c] - full_std[c]) <= 3 * subset["std_se"][c]
    code, out, err = call(capsys, "fit", root, "--max-samples", 40, "--seed", 7, "--cache", tmp_path / "cache",
                          "--workers", 0)  # the human table, standard errors included (a cache hit)
    assert code == 0 and "(se)" in out and f"± {subset['mean_se'][0]:.2g}" in out, err
    chosen = [paths[i] for i in subset_indices(90, 40, seed=7)]  # the subset is the documented one
    mean, std, _ = reference(chosen, "RGB")
    np.testing.assert_allclose(report["mean"], mean, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(report["std"], std, rtol=0, atol=TOLERANCE)


# --- ls, show, export, rm ----------------------------------------------------------------------


def h5_entry(cache: Path, key: str) -> dict:
    """The entry as plain h5py shows it."""
    with h5py.File(entry_file(cache, key), "r") as handle:
        return {name: handle[name][()] for name in ("mean", "std", "count")} | {"attrs": dict(handle.attrs)}


def test_ls_lists_what_the_folder_holds(fitted, capsys):
    cache = fitted["cache"]
    keys = []
    for file in cache.glob("*.h5"):
        with h5py.File(file, "r") as handle:
            keys.append(handle.attrs["key"])
    keys.sort()
    code, out, err = call(capsys, "ls", cache)
    assert code == 0, err
    assert all(key in out for key in keys)
    code, out, _ = call(capsys, "ls", "--cache", cache, "--json")
    rows = json.loads(out)
    assert code == 0 and [row["key"] for row in rows] == keys == [e.key for e in list_entries(cache)]
    stored = h5_entry(cache, keys[0])
    assert rows[0]["num_samples"] == stored["attrs"]["num_samples"] == 7
    assert rows[0]["pixels_per_channel"] == stored["count"][0]
    assert rows[0]["file"] == str(entry_file(cache, keys[0])) and rows[0]["bytes"] == entry_file(cache, keys[0]).stat().st_size
    assert str(fitted["json"]["source"]) == rows[0]["source"]


def test_ls_tells_entries_apart(tree, tmp_path, capsys):
    """Three folders of the same kind fitted into one cache: each row names its folder; reads show up."""
    roots = []
    for name in ("train", "val", "test"):
        roots.append(tmp_path / name)
        shutil.copytree(tree["root"] / "cat", roots[-1])
        code, _, err = call(capsys, "fit", roots[-1], "--cache", tmp_path / "cache", "--workers", 0, "--no-progress")
        assert code == 0, err
    code, out, _ = call(capsys, "ls", tmp_path / "cache")
    rows = out.splitlines()[2:]
    assert code == 0 and len(rows) == 3 and len(set(rows)) == 3
    assert sorted(next(str(r) for r in roots if f"{r} (" in row) for row in rows) == sorted(map(str, roots))
    assert all("just now never" in " ".join(row.split()) for row in rows)  # created just now, never read since
    assert out.splitlines()[1].split() == ["KEY", "IMAGES", "CH", "SIZE", "CREATED", "LAST", "READ", "SOURCE"]
    code, out, _ = call(capsys, "ls", tmp_path / "cache", "--json")
    first = json.loads(out)[0]
    assert first["last_read"] is None
    call(capsys, "show", first["key"], "--cache", tmp_path / "cache")
    code, out, _ = call(capsys, "ls", tmp_path / "cache", "--json")
    assert json.loads(out)[0]["last_read"] is not None and json.loads(out)[1]["last_read"] is None


def test_show_prints_the_entry_its_provenance_and_its_pipeline(fitted, capsys):
    key, cache = fitted["json"]["key"], fitted["cache"]
    code, out, err = call(capsys, "show", key, "--cache", cache, "--json")
    assert code == 0, err
    shown, stored = json.loads(out), h5_entry(cache, key)
    np.testing.assert_array_equal(shown["mean"], stored["mean"])
    np.testing.assert_array_equal(shown["std"], stored["std"])
    assert shown["attrs"]["created_utc"] == stored["attrs"]["created_utc"]
    assert shown["attrs"]["pipeline"] == stored["attrs"]["pipeline"]
    assert "ToImage()" in stored["attrs"]["pipeline"] and "ToDtype" in stored["attrs"]["pipeline"]
    code, out, _ = call(capsys, "show", key, "--cache", cache)
    assert code == 0 and "provenance:" in out and "torch_version" in out and key in out and "ToImage()" in out


def test_export_formats_carry_the_stored_numbers(fitted, capsys):
    key, cache = fitted["json"]["key"], fitted["cache"]
    stored = h5_entry(cache, key)
    code, out, err = call(capsys, "export", key, "--cache", cache, "--format", "hf")
    assert code == 0, err
    assert json.loads(out) == {"image_mean": stored["mean"].tolist(), "image_std": stored["std"].tolist()}
    code, out, _ = call(capsys, "export", key, "--cache", cache, "--format", "json")
    assert code == 0 and json.loads(out) == {"key": key, "mean": stored["mean"].tolist(), "std": stored["std"].tolist()}
    code, out, _ = call(capsys, "export", key, "--cache", cache)
    namespace = {"transforms": type("T", (), {"Normalize": staticmethod(lambda mean, std: (mean, std))})}
    mean, std = eval(out, namespace)  # the line pastes into code
    np.testing.assert_allclose(mean, stored["mean"], atol=1e-8)
    np.testing.assert_allclose(std, stored["std"], atol=1e-8)


def test_export_o_writes_one_file_to_hand_over(fitted, tmp_path, capsys):
    key, cache = fitted["json"]["key"], fitted["cache"]
    out_file = tmp_path / "stats.h5"
    code, out, err = call(capsys, "export", key, "--cache", cache, "-o", out_file)
    assert code == 0 and out.strip() == str(out_file), err
    assert out_file.read_bytes() == entry_file(cache, key).read_bytes()
    with h5py.File(out_file, "r") as handle:  # what a colleague sees with plain h5py
        assert handle.attrs["key"] == key and handle.attrs["num_samples"] == 7
    code, out, err = call(capsys, "show", "--cache", out_file, key, "--json")
    assert code == 0 and json.loads(out)["key"] == key, err
    code, out, _ = call(capsys, "ls", out_file)
    assert code == 0 and key in out and "1 entry" in out
    labels = tmp_path / "labels.csv"
    labels.write_text("a,b\n")
    code, _, err = call(capsys, "export", key, "--cache", cache, "-o", labels)
    assert code == 1 and "not a torchnormfit entry file" in err and labels.read_text() == "a,b\n"


def test_rm_removes_the_entry_file(fitted, tmp_path, capsys):
    cache = tmp_path / "copy"
    shutil.copytree(fitted["cache"], cache)
    key = fitted["json"]["key"]
    assert entry_file(cache, key).exists()
    code, out, err = call(capsys, "rm", key, "--cache", cache)
    assert code == 0 and key in out, err
    assert not entry_file(cache, key).exists()
    code, _, err = call(capsys, "rm", key, "--cache", cache)
    assert code == 1 and key in err
    code, _, err = call(capsys, "show", key, "--cache", cache)
    assert code == 1 and "No entry" in err


def _write_aged(cache: Path, ages_days: dict[str, float], now: float) -> None:
    """Entries ``key`` created ``days`` before ``now`` (their created_utc), each in its own entry file."""
    for seed, (key, days) in enumerate(ages_days.items()):
        created = datetime.fromtimestamp(now - days * 86400, timezone.utc).isoformat()
        write_entry(cache, key, make_stats(seed), entry_attrs(seed, created_utc=created))


def test_rm_many_keys_is_all_or_nothing(tmp_path, capsys):
    cache = tmp_path / "cache"
    _write_aged(cache, {"a": 1, "b": 1, "s1": 2, "s2": 3}, time.time())
    code, _, err = call(capsys, "rm", "a", "s1", "nope", "--cache", cache)
    assert code == 1 and "nope" in err
    assert [e.key for e in list_entries(cache)] == ["a", "b", "s1", "s2"]
    code, out, err = call(capsys, "rm", "a", "s1", "--cache", cache, "--json")
    assert code == 0, err
    assert json.loads(out)["removed"] == ["a", "s1"]
    assert [e.key for e in list_entries(cache)] == ["b", "s2"]


def test_rm_prunes_by_age_and_by_count(tmp_path, capsys):
    now, cache = time.time(), tmp_path / "cache"
    _write_aged(cache, {"d1": 1, "d10": 10, "d40": 40, "d400": 400}, now)
    code, out, err = call(capsys, "rm", "--older-than", "30d", "--cache", cache, "--json")
    assert code == 0, err
    assert sorted(json.loads(out)["removed"]) == ["d40", "d400"]
    assert [e.key for e in list_entries(cache)] == ["d1", "d10"]
    code, out, _ = call(capsys, "rm", "--keep-last", "1", "--cache", cache)
    assert code == 0 and out.strip() == f"removed d10 from {cache}"
    code, out, _ = call(capsys, "rm", "--older-than", "2w", "--keep-last", "0", "--cache", cache)
    assert code == 0 and out.strip() == f"nothing to remove in {cache}"
    assert [e.key for e in list_entries(cache)] == ["d1"]


# --- plots -------------------------------------------------------------------------------------


def is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > len(PNG_SIGNATURE) and path.read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib (the plot extra) is not installed")
def test_plots_are_png_files(tree, tmp_path, capsys):
    plot = tmp_path / "fit.png"
    code, out, err = call(capsys, "fit", tree["root"], "--skip-bad", "--cache", tmp_path / "cache", "--workers", 0,
                          "--plot", plot)
    assert code == 0, err
    assert is_png(plot) and f"plot: {plot}" in out
    key = list_entries(tmp_path / "cache")[0].key
    code, out, err = call(capsys, "show", key, "--cache", tmp_path / "cache", "--plot", tmp_path / "show.png")
    assert code == 0, err
    assert is_png(tmp_path / "show.png")


def test_plot_without_matplotlib_names_the_extra(tree, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    code, out, err = call(capsys, "fit", tree["root"], "--cache", tmp_path / "cache", "--plot", tmp_path / "p.png")
    assert code == 1 and out == ""
    assert "torchnormfit[plot]" in err
    assert not (tmp_path / "cache").exists()  # it fails before the pass


# --- usage -------------------------------------------------------------------------------------


def test_usage_errors_exit_2(tree, tmp_path, capsys):
    result = run("fit", "--cache", tmp_path / "cache", tmp=tmp_path)
    assert result.returncode == 2 and "SOURCE" in result.stderr and result.stdout == ""
    for args in [
        ("fit", tree["root"], "--dataset", "CIFAR10"),
        ("fit", "--dataset", "NoSuchSet", "--root", tmp_path),
        ("fit", "--dataset", "CIFAR10"),
        ("fit", "--dataset", "CIFAR10", "--root", tmp_path, "--split", "val"),
        ("fit", "--dataset", "CIFAR10", "--root", tmp_path, "--skip-bad"),
        ("fit", tree["root"], "--mode", "P"),
        ("fit", tree["root"], "--batch-size", "0"),
        ("fit", tree["root"], "--seed", "3"),
        ("export", "key", "--format", "yaml"),
        ("rm",),
        ("rm", "--older-than", "3x"),
        ("rm", "--keep-last", "-1"),
        ("frobnicate",),
        (),
    ]:
        code, out, err = call(capsys, *args)
        assert code == 2, args
        assert "usage:" in err and out == ""


def test_missing_cache_and_folder_are_failures(tmp_path, capsys):
    code, _, err = call(capsys, "show", "k", "--cache", tmp_path / "none")
    assert code == 1 and "There is no cache at" in err
    code, out, _ = call(capsys, "ls", tmp_path / "none")
    assert code == 0 and "no entries" in out
    code, _, err = call(capsys, "fit", tmp_path / "nowhere", "--cache", tmp_path / "cache")
    assert code == 1 and "nowhere" in err
    (tmp_path / "empty").mkdir()
    code, _, err = call(capsys, "fit", tmp_path / "empty", "--cache", tmp_path / "cache")
    assert code == 1 and "no image files" in err.lower()


def test_show_prints_the_percentiles_of_an_entry_fitted_with_clip(tmp_path, capsys):
    """An entry that counted its values (``clip=``) shows each channel's percentiles, numpy's on the same pixels."""
    from torchnormfit import FitNormalize

    images = torch.randint(0, 256, (6, 2, 5, 7), generator=torch.Generator().manual_seed(4)).to(torch.uint8)
    norm = FitNormalize(cache=tmp_path / "cache", key="clipped", clip=(1.0, 99.0))
    norm.fit(list(images), num_workers=0, progress=False)
    code, out, err = call(capsys, "show", "clipped", "--cache", tmp_path / "cache", "--json")
    assert code == 0, err
    shown = json.loads(out)["percentiles"]
    pixels = images.permute(1, 0, 2, 3).reshape(2, -1).double().numpy()
    for q in ("0.5", "1", "50", "99.5"):
        np.testing.assert_allclose(shown[q], np.percentile(pixels, float(q), axis=1), rtol=0, atol=1e-9)
    code, out, _ = call(capsys, "show", "clipped", "--cache", tmp_path / "cache")
    assert code == 0 and "percentile" in out and "99.5" in out
    write_entry(tmp_path / "cache", "plain", make_stats(0), {})
    code, out, _ = call(capsys, "show", "plain", "--cache", tmp_path / "cache", "--json")
    assert code == 0 and json.loads(out)["percentiles"] is None


def test_ignore_and_clip_options_reach_the_fit(tree, tmp_path, capsys):
    """--ignore leaves a value's pixels out (fewer counted), --clip learns percentiles that show prints."""
    common = [tree["root"] / "cat", "--workers", 0, "--no-progress", "--json"]
    code, out, err = call(capsys, "fit", *common, "--cache", tmp_path / "a")
    assert code == 0, err
    plain = json.loads(out)
    lowest = ",".join(repr(value) for value in plain["min"])  # each channel's smallest value, left out
    code, out, err = call(capsys, "fit", *common, "--cache", tmp_path / "b", "--ignore", lowest, "--clip", "1,99")
    assert code == 0, err
    fitted = json.loads(out)
    assert fitted["key"] != plain["key"] and fitted["pixels_per_channel"] < plain["pixels_per_channel"]
    assert all(low > plain_low for low, plain_low in zip(fitted["min"], plain["min"]))
    code, out, err = call(capsys, "show", fitted["key"], "--cache", tmp_path / "b", "--json")
    assert code == 0 and set(json.loads(out)["percentiles"]) >= {"1", "99"}, err
    code, out, err = call(capsys, "fit", *common, "--cache", tmp_path / "c", "--clip", "1,99",
                          "--exact-percentiles", "yes")
    assert code == 0, err
    exact = json.loads(out)
    code, out, err = call(capsys, "show", exact["key"], "--cache", tmp_path / "c", "--json")
    shown = json.loads(out)["percentiles"]
    pixels = np.concatenate([np.asarray(PIL.Image.open(f).convert("RGB"), dtype=np.float32).reshape(-1, 3) / 255
                             for f in tree["good"] if f.parent.name == "cat"]).astype(np.float64)
    for q in ("1", "99"):
        assert shown[q] == np.percentile(pixels, float(q), axis=0).tolist(), q
    for bad in (["--clip", "1"], ["--clip", "a,b"], ["--spatial-dims", "4"], ["--exact-percentiles", "yes"]):
        code, _, err = call(capsys, "fit", *common, *bad)
        assert code == 2 and "usage:" in err


# --- 16-bit PNG and TIFF: integer images in their own units ------------------------------------


def _fit_json(capsys: pytest.CaptureFixture, folder: Path, tmp: Path) -> dict:
    code, out, err = call(capsys, "fit", folder, "--cache", tmp / "cache", "--workers", 0, "--no-progress", "--json")
    assert code == 0, err
    return json.loads(out)


def _expect(report: dict, arrays: list[np.ndarray]) -> None:
    """The report's per-channel mean, std, min and max equal numpy's over the (C, H, W) arrays, in their units."""
    pixels = np.concatenate([a.reshape(a.shape[0], -1).astype(np.float64) for a in arrays], axis=1)
    np.testing.assert_allclose(report["mean"], pixels.mean(axis=1), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(report["std"], pixels.std(axis=1), rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(report["min"], pixels.min(axis=1))
    np.testing.assert_array_equal(report["max"], pixels.max(axis=1))


@pytest.fixture
def tifffile_module():
    return pytest.importorskip("tifffile")


def test_uint16_single_band_tiffs_are_fitted_in_their_own_units(capsys, tmp_path, tifffile_module):
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 10_000, size=(h, w), dtype=np.uint16) for h, w in ((9, 7), (12, 12))]
    (tmp_path / "scenes").mkdir()
    for i, array in enumerate(arrays):
        tifffile_module.imwrite(tmp_path / "scenes" / f"{i}.tif", array)
    _expect(_fit_json(capsys, tmp_path / "scenes", tmp_path), [a[None] for a in arrays])


def test_13_band_planar_tiffs_are_13_channels(capsys, tmp_path, tifffile_module):
    rng = np.random.default_rng(2)
    (tmp_path / "s2").mkdir()
    arrays = [rng.integers(0, 4096, size=(13, 8, 6 + i), dtype=np.uint16) for i in range(3)]
    for i, array in enumerate(arrays):
        tifffile_module.imwrite(tmp_path / "s2" / f"{i}.tiff", array, photometric="minisblack", planarconfig="separate")
    report = _fit_json(capsys, tmp_path / "s2", tmp_path)
    assert len(report["mean"]) == 13
    _expect(report, arrays)


def test_multi_page_tiffs_are_one_channel_a_page(capsys, tmp_path, tifffile_module):
    rng = np.random.default_rng(3)
    (tmp_path / "stacks").mkdir()
    arrays = [rng.integers(0, 255, size=(4, 10, 10), dtype=np.uint8), rng.integers(0, 255, size=(4, 7, 9), dtype=np.uint8)]
    for i, array in enumerate(arrays):
        with tifffile_module.TiffWriter(tmp_path / "stacks" / f"{i}.tif") as tif:
            for page in array:
                tif.write(page, photometric="minisblack", contiguous=False)
    report = _fit_json(capsys, tmp_path / "stacks", tmp_path)
    assert len(report["mean"]) == 4
    _expect(report, arrays)


def test_rgb_uint8_tiff_is_read_like_an_8_bit_png(capsys, tmp_path, tifffile_module):
    rng = np.random.default_rng(4)
    (tmp_path / "rgb").mkdir()
    arrays = [rng.integers(0, 256, size=(11, 13, 3), dtype=np.uint8) for _ in range(2)]
    for i, array in enumerate(arrays):
        tifffile_module.imwrite(tmp_path / "rgb" / f"{i}.tif", array, photometric="rgb")
    report = _fit_json(capsys, tmp_path / "rgb", tmp_path)
    assert report["channels"] == ["R", "G", "B"]
    scaled = [a.transpose(2, 0, 1).astype(np.float64) / 255 for a in arrays]  # 8 bits: ToDtype(scale=True), as PNG
    pixels = np.concatenate([a.reshape(3, -1) for a in scaled], axis=1)
    np.testing.assert_allclose(report["mean"], pixels.mean(axis=1), atol=TOLERANCE)
    np.testing.assert_allclose(report["std"], pixels.std(axis=1), atol=TOLERANCE)


def test_rgb_uint16_tiff_is_three_channels_in_its_units(capsys, tmp_path, tifffile_module):
    rng = np.random.default_rng(5)
    (tmp_path / "rgb16").mkdir()
    arrays = [rng.integers(0, 65_536, size=(6, 5, 3), dtype=np.uint16) for _ in range(2)]
    for i, array in enumerate(arrays):
        tifffile_module.imwrite(tmp_path / "rgb16" / f"{i}.tif", array, photometric="rgb")
    _expect(_fit_json(capsys, tmp_path / "rgb16", tmp_path), [a.transpose(2, 0, 1) for a in arrays])


def test_16_bit_pngs_are_fitted_in_their_own_units(capsys, tmp_path):
    rng = np.random.default_rng(6)
    (tmp_path / "png16").mkdir()
    arrays = [rng.integers(0, 65_536, size=(h, w), dtype=np.uint16) for h, w in ((10, 8), (5, 5))]
    for i, array in enumerate(arrays):
        PIL.Image.fromarray(array).save(tmp_path / "png16" / f"{i}.png")
        with PIL.Image.open(tmp_path / "png16" / f"{i}.png") as image:
            assert image.mode.startswith("I;16")
    _expect(_fit_json(capsys, tmp_path / "png16", tmp_path), [a[None] for a in arrays])


@pytest.mark.parametrize("channels", [3, 4, 2])
@pytest.mark.parametrize("workers", ["0", "2"])
def test_16_bit_rgb_rgba_and_gray_alpha_pngs_are_fitted_in_their_own_units(capsys, tmp_path, channels, workers):
    """48-bit RGB, 64-bit RGBA and 32-bit gray + alpha PNGs: one channel a sample (alpha too, as in a TIFF), each
    exactly numpy's float64 statistics of the uint16 values written. PIL opens them as 8-bit RGB or RGBA: they were
    fitted as 8 bits, with no warning (a value of 1000 came back as 232)."""
    rng = np.random.default_rng(13)
    arrays = [rng.integers(0, 65_536, size=(h, w, channels), dtype=np.uint16) for h, w in ((9, 7), (6, 11), (5, 5))]
    arrays[0][0, 0] = 1000
    for i, array in enumerate(arrays):
        write_png16(tmp_path / "png48" / f"{i}.png", array)
    code, out, err = call(capsys, "fit", tmp_path / "png48", "--cache", tmp_path / "cache", "--workers", workers,
                          "--batch-size", "2", "--no-progress", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert len(report["mean"]) == channels and "values=uint16 as stored" in report["source"]
    _expect(report, [a.transpose(2, 0, 1) for a in arrays])


@pytest.mark.parametrize("first_bits", [8, 16])
def test_a_png_of_the_other_bit_depth_than_the_first_is_named_not_rescaled(capsys, tmp_path, first_bits):
    """8-bit RGB PNGs and one 48-bit PNG (or the other way round): exit 1 naming the odd file; --skip-bad fits the
    others, each as its own kind."""
    rng = np.random.default_rng(14)
    eights = [random_image(rng, (5, 4), 3, 0.5) for _ in range(2)]
    sixteens = [rng.integers(0, 65_536, size=(4, 5, 3), dtype=np.uint16) for _ in range(2)]
    folder = tmp_path / "mixed"
    if first_bits == 8:
        write_image(folder / "a.png", eights[0])
        write_image(folder / "b.png", eights[1])
        write_png16(folder / "c.png", sixteens[0])
    else:
        write_png16(folder / "a.png", sixteens[0])
        write_png16(folder / "b.png", sixteens[1])
        write_image(folder / "c.png", eights[0])
    code, out, err = call(capsys, "fit", folder, "--cache", tmp_path / "cache", "--workers", 0, "--no-progress")
    assert code == 1 and out == "" and f"{folder / 'c.png'}" in err and "Keep files of one kind" in err
    code, out, err = call(capsys, "fit", folder, "--cache", tmp_path / "cache", "--workers", 0, "--no-progress",
                          "--skip-bad", "--json")
    assert code == 0, err
    assert "skipped" in err and "c.png" in err
    report = json.loads(out)
    assert report["skipped_files"] == [str(folder / "c.png")]
    if first_bits == 16:
        _expect(report, [a.transpose(2, 0, 1) for a in sixteens])
    else:
        pixels = np.concatenate([a.reshape(-1, 3).astype(np.float64) / 255 for a in eights])
        np.testing.assert_allclose(report["mean"], pixels.mean(axis=0), atol=TOLERANCE)


def test_an_8_bit_png_among_16_bit_ones_is_named(capsys, tmp_path):
    rng = np.random.default_rng(7)
    (tmp_path / "mixed").mkdir()
    PIL.Image.fromarray(rng.integers(0, 65_536, size=(4, 4), dtype=np.uint16)).save(tmp_path / "mixed" / "a.png")
    write_image(tmp_path / "mixed" / "b.png", random_image(rng, (4, 4), 1, 0.5))
    code, _, err = call(capsys, "fit", tmp_path / "mixed", "--cache", tmp_path / "cache", "--workers", 0,
                        "--no-progress")
    assert code == 1 and "b.png" in err and "Keep files of one kind" in err


def test_tiff_without_tifffile_names_the_extra(tmp_path, tifffile_module):
    (tmp_path / "t").mkdir()
    tifffile_module.imwrite(tmp_path / "t" / "a.tif", np.zeros((3, 5, 5), dtype=np.uint16), photometric="minisblack")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    script = ("import sys; sys.modules['tifffile'] = None\n"
              "from torchnormfit.cli import main\n"
              f"sys.exit(main(['fit', {str(tmp_path / 't')!r}, '--cache', {str(tmp_path / 'c')!r}, '--no-progress']))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1, result.stderr
    assert 'pip install "torchnormfit[tiff]"' in result.stderr and "a.tif" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_4_d_tiff_is_refused_with_its_shape(capsys, tmp_path, tifffile_module):
    (tmp_path / "v").mkdir()
    tifffile_module.imwrite(tmp_path / "v" / "a.tif", np.zeros((2, 5, 6, 3), dtype=np.uint16), photometric="rgb")
    code, _, err = call(capsys, "fit", tmp_path / "v", "--cache", tmp_path / "cache", "--workers", 0, "--no-progress")
    assert code == 1 and "a.tif" in err and "(2, 5, 6, 3)" in err and "4 dimensions" in err


def test_integer_tiffs_resize_and_crop_keep_their_units(capsys, tmp_path, tifffile_module):
    (tmp_path / "r").mkdir()
    tifffile_module.imwrite(tmp_path / "r" / "a.tif", np.full((13, 40, 30), 1234, dtype=np.uint16),
                            photometric="minisblack")
    code, out, err = call(capsys, "fit", tmp_path / "r", "--resize", 20, "--center-crop", 16, "--cache",
                          tmp_path / "cache", "--workers", 0, "--no-progress", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["pixels_per_channel"] == 16 * 16
    np.testing.assert_allclose(report["mean"], [1234] * 13, rtol=1e-6)  # float32 after Resize: not truncated
    np.testing.assert_allclose(report["std"], [0] * 13, atol=1e-3)


@pytest.mark.parametrize("suffix", [".tif", ".png"])
def test_a_16_bit_folder_is_shown_as_read_not_as_mode_rgb(capsys, tmp_path, tifffile_module, suffix):
    """fit, ls and show name how the values were read (uint16 as stored); no PIL mode was applied, none is claimed."""
    rng = np.random.default_rng(8)
    (tmp_path / "u16").mkdir()
    for i in range(2):
        array = rng.integers(0, 65_536, size=(6, 7), dtype=np.uint16)
        if suffix == ".tif":
            tifffile_module.imwrite(tmp_path / "u16" / f"{i}.tif", array)
        else:
            PIL.Image.fromarray(array).save(tmp_path / "u16" / f"{i}.png")
    code, out, err = call(capsys, "fit", tmp_path / "u16", "--cache", tmp_path / "cache", "--workers", 0,
                          "--no-progress")
    assert code == 0, err
    source = next(line for line in out.splitlines() if line.startswith("source: "))
    assert source == f"source: ImageFiles {tmp_path / 'u16'} (2 samples, integers=True, layout=flat, values=uint16 as stored)"
    code, out, err = call(capsys, "ls", tmp_path / "cache", "--json")
    (row,) = json.loads(out)
    assert row["source"] == source.removeprefix("source: ")
    code, out, err = call(capsys, "show", row["key"], "--cache", tmp_path / "cache", "--json")
    dataset = json.loads(json.loads(out)["attrs"]["dataset"])
    assert "mode" not in dataset and dataset["values"] == "uint16 as stored" and dataset["integers"] is True
    code, out, err = call(capsys, "show", row["key"], "--cache", tmp_path / "cache")
    assert code == 0 and "mode" not in out and "uint16 as stored" in out


def test_an_8_bit_folder_is_still_shown_with_its_mode(capsys, tmp_path):
    root = tmp_path / "eight"
    write_image(root / "a.png", random_image(np.random.default_rng(9), (5, 4), 3, 0.5))
    code, out, err = call(capsys, "fit", root, "--cache", tmp_path / "cache", "--workers", 0, "--no-progress")
    assert code == 0, err
    assert f"source: ImageFiles {root} (1 samples, layout=flat, mode=RGB)\n" in out


# --- signed TIFFs, shapes and channel counts that differ between files ----------------------------


def _write_tiffs(tifffile_module: object, folder: Path, arrays: list[np.ndarray]) -> None:
    """One TIFF a (C, H, W) array: 1 band as (H, W), 3 as RGB samples a pixel, more as planar bands."""
    folder.mkdir()
    for i, array in enumerate(arrays):
        if array.shape[0] == 1:
            tifffile_module.imwrite(folder / f"{i}.tif", array[0])
        elif array.shape[0] == 3:
            tifffile_module.imwrite(folder / f"{i}.tif", array.transpose(1, 2, 0), photometric="rgb")
        else:
            tifffile_module.imwrite(folder / f"{i}.tif", array, photometric="minisblack", planarconfig="separate")


@pytest.mark.parametrize("dtype, low, high", [(np.int8, -128, 128), (np.int16, -1024, 3001)])
def test_signed_tiffs_print_and_save_the_float64_statistics(capsys, tmp_path, tifffile_module, dtype, low, high):
    """int8, and int16 CT-like Hounsfield values (-1024 air to 3000 bone): printed and cached as numpy computes."""
    rng = np.random.default_rng(10)
    arrays = [rng.integers(low, high, size=(1, h, w), dtype=dtype) for h, w in ((16, 16), (9, 13), (1, 30))]
    arrays[0][0, 0, :2] = low, high - 1  # both ends of the range are in the data
    _write_tiffs(tifffile_module, tmp_path / "ct", arrays)
    report = _fit_json(capsys, tmp_path / "ct", tmp_path)
    _expect(report, arrays)
    assert report["min"] == [low] and report["max"] == [high - 1]
    assert report["pixels_per_channel"] == sum(a[0].size for a in arrays)
    saved = h5_entry(tmp_path / "cache", report["key"])
    pixels = np.concatenate([a.ravel() for a in arrays]).astype(np.float64)
    np.testing.assert_allclose(saved["mean"], [pixels.mean()], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(saved["std"], [pixels.std()], rtol=1e-9, atol=1e-9)
    assert f"values={np.dtype(dtype).name} as stored" in report["source"]


@pytest.mark.parametrize("channels", [1, 3, 5])
def test_tiffs_of_different_shapes_weigh_each_pixel_once(capsys, tmp_path, tifffile_module, channels):
    """32x32 and 48x40 (and 7x3) files, same channel count: the statistics of all their pixels, each counted once."""
    rng = np.random.default_rng(11)
    arrays = [rng.integers(-1024, 3001, size=(channels, h, w), dtype=np.int16) for h, w in ((32, 32), (48, 40), (7, 3))]
    arrays[1] += 500  # the big file is brighter: weighing files, not pixels, would show
    _write_tiffs(tifffile_module, tmp_path / "shapes", arrays)
    report = _fit_json(capsys, tmp_path / "shapes", tmp_path)
    assert report["pixels_per_channel"] == 32 * 32 + 48 * 40 + 7 * 3
    _expect(report, arrays)


@pytest.mark.parametrize("workers", ["0", "2"])
@pytest.mark.parametrize("batch_size", [None, "1"])  # the odd file in the first batch, or in a later one
def test_tiffs_with_different_channel_counts_fail_naming_the_file(capsys, tmp_path, tifffile_module, batch_size,
                                                                   workers):
    rng = np.random.default_rng(12)
    arrays = [rng.integers(0, 4096, size=(c, 8, 8), dtype=np.uint16) for c in (3, 3, 1)]
    _write_tiffs(tifffile_module, tmp_path / "mixed", arrays)
    options = [] if batch_size is None else ["--batch-size", batch_size]
    code, out, err = call(capsys, "fit", tmp_path / "mixed", "--cache", tmp_path / "cache", "--workers", workers,
                          "--no-progress", *options)
    assert code == 1 and out == ""
    assert f"{tmp_path / 'mixed' / '2.tif'} has 1 channel(s), but {tmp_path / 'mixed' / '0.tif'} has 3" in err
    assert "same number of channels" in err and "Traceback" not in err
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*.h5"))


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_channel_count_that_changes_within_a_batch_names_both_files(capsys, tmp_path, tifffile_module, workers):
    """Files 2 and 3 in one batch of 2: the mismatch is found where the batch is reduced (a worker with --workers 2)
    and still names both files."""
    rng = np.random.default_rng(15)
    arrays = [rng.integers(0, 4096, size=(c, 8, 8), dtype=np.uint16) for c in (3, 3, 3, 1)]
    _write_tiffs(tifffile_module, tmp_path / "mixed", arrays)
    code, out, err = call(capsys, "fit", tmp_path / "mixed", "--cache", tmp_path / "cache", "--workers", workers,
                          "--batch-size", "2", "--no-progress")
    assert code == 1 and out == ""
    assert f"{tmp_path / 'mixed' / '3.tif'} has 1 channel(s), but {tmp_path / 'mixed' / '2.tif'} has 3" in err
    assert "Traceback" not in err
