"""FitNormalize and its HDF5 cache: hits across processes, misses when the pipeline changes, faults."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import pytest
import torch
from datasets_for_tests import CountingDataset
from torchvision.transforms import v2

from torchnormfit import CacheError, CacheWarning, FitNormalize, list_entries

TESTS = Path(__file__).parent


def run_python(code, **env):
    """Run code in a fresh interpreter (a new 'run' of a user's script); return its JSON output."""
    script = f"import sys, json; sys.path.insert(0, {str(TESTS)!r})\n" + textwrap.dedent(code)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, **env}, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


FIT_SCRIPT = """

from datasets_for_tests import CountingDataset
from torchnormfit import FitNormalize
from torchvision.transforms import v2
norm = FitNormalize(cache=sys.argv[1] if len(sys.argv) > 1 else %r)
dataset = CountingDataset(n=30, transform=v2.Compose([norm, v2.RandomErasing()]), log=%r)
norm.fit(dataset, num_workers=%d, progress=False, verify=%r)
print(json.dumps({"mean": norm.mean, "std": norm.std}))
"""


def test_cache_written_by_one_process_is_hit_by_another_reading_only_the_verified_samples(tmp_path):
    cache, log = tmp_path / "cache", tmp_path / "reads.log"
    first = run_python(FIT_SCRIPT % (str(cache), str(log), 2, None))
    assert len(log.read_text().split()) == 30 and len(list_entries(cache)) == 1
    unverified = run_python(FIT_SCRIPT % (str(cache), str(log), 2, 0), NO_READS="1")
    assert unverified == first  # bit-identical floats, and NO_READS would have raised on any read
    verified = run_python(FIT_SCRIPT % (str(cache), str(log), 2, 8))
    reads = log.read_text().split()
    assert verified == first and len(reads) == 30 + 8 and len(set(reads[30:])) == 8  # 8 distinct samples read again


def test_default_cache_file_comes_from_the_environment(tmp_path):
    target = tmp_path / "elsewhere" / "cache"
    norm = FitNormalize()
    os.environ["TORCHNORMFIT_CACHE"] = str(target)  # restored by the conftest monkeypatch
    norm.fit(CountingDataset(n=5, transform=norm), num_workers=0, progress=False)
    assert [e.attrs["num_samples"] for e in list_entries(target)] == [5]


def fit(norm, dataset, **kwargs):
    return norm.fit(dataset, num_workers=0, progress=False, **kwargs)


def test_changed_pipeline_misses_and_both_entries_are_kept(tmp_path):
    cache = tmp_path / "cache"
    norm = FitNormalize(cache=cache)
    fit(norm, CountingDataset(n=10, transform=norm))
    scaled = FitNormalize(cache=cache)
    fit(scaled, CountingDataset(n=10, transform=v2.Compose([v2.Lambda(lambda x: x * 1.5), scaled])))
    assert scaled.mean == pytest.approx([1.5 * m for m in norm.mean], rel=1e-6)
    entries = list_entries(cache)
    assert len(entries) == 2 and all(e.attrs["num_samples"] == 10 for e in entries)


def test_refit_forces_a_pass_and_replaces_the_entry(tmp_path):
    cache, log = tmp_path / "cache", tmp_path / "reads.log"
    norm = FitNormalize(cache=cache)
    fit(norm, CountingDataset(n=6, transform=norm, log=log))
    fit(norm, CountingDataset(n=6, transform=norm, log=log), verify=0)
    assert len(log.read_text().split()) == 6 and norm.fit_record.source == "cache"
    fit(norm, CountingDataset(n=6, transform=norm, log=log), refit=True)
    assert len(log.read_text().split()) == 12 and len(list_entries(cache)) == 1
    assert norm.fit_record.source == "pass" and norm.fit_record.written


def test_user_key_and_from_cache(tmp_path):
    cache = tmp_path / "cache"
    norm = fit(FitNormalize(cache=cache, key="my-data"), CountingDataset(n=8))
    loaded = FitNormalize.from_cache(cache, "my-data")
    assert loaded.mean == norm.mean and loaded.std == norm.std
    for name, value in norm.stats.to_dict().items():
        assert torch.equal(loaded.stats.to_dict()[name], value)
    with pytest.raises(CacheError, match=r"No cache entry 'other'.*\['my-data'\]"):
        FitNormalize.from_cache(cache, "other")
    with pytest.raises(ValueError, match="without '/'"):
        FitNormalize(key="a/b")


def test_provenance_is_stored_and_readable_with_plain_h5py(tmp_path):
    cache = tmp_path / "cache"
    norm = FitNormalize(cache=cache, key="prov")
    fit(norm, CountingDataset(n=9, transform=v2.Compose([v2.Resize(4), norm])))
    with h5py.File(cache / "prov.h5", "r") as f:  # the documented name: the key
        group = f
        assert f.attrs["format"] == "torchnormfit.entry" and group.attrs["schema_version"] == 1
        assert group.attrs["num_samples"] == 9 and group.attrs["ddof"] == 0
        assert "Resize" in group.attrs["pipeline"] and "CountingDataset" in group.attrs["dataset"]
        for name in ("torch_version", "torchvision_version", "torchnormfit_version", "created_utc"):
            assert group.attrs[name]
        assert group["mean"][()].tolist() == norm.mean and group["std"].dtype == "float64"


def test_corrupt_entry_warns_refits_and_keeps_the_corrupt_file(tmp_path):
    cache = tmp_path / "cache"
    norm = fit(FitNormalize(cache=cache, key="k"), CountingDataset(n=5))
    file = cache / "k.h5"
    damaged = file.read_bytes()[:-100]
    file.write_bytes(damaged)
    norm = FitNormalize(cache=cache, key="k")
    with pytest.warns(CacheWarning) as record:
        fit(norm, CountingDataset(n=5, transform=norm))
    messages = " ".join(str(w.message) for w in record)
    assert str(file) in messages and "fitting again" in messages and "moved to" in messages
    assert norm.mean is not None and len(list_entries(cache)) == 1
    assert [p.read_bytes() for p in cache.iterdir() if ".corrupt-" in p.name] == [damaged]


def test_invalid_entry_is_never_used(tmp_path):
    cache = tmp_path / "cache"
    norm = fit(FitNormalize(cache=cache, key="k"), CountingDataset(n=5))
    good = list(norm.mean)
    with h5py.File(cache / "k.h5", "r+") as f:  # an edit by hand, its digest computed again
        f["mean"][0] = float("nan")
    data = bytearray((cache / "k.h5").read_bytes())
    data[:512] = f"torchnormfit entry\nschema_version 1\nsha256 {hashlib.sha256(data[512:]).hexdigest()}\n".encode().ljust(512, b"\0")
    (cache / "k.h5").write_bytes(bytes(data))
    again = FitNormalize(cache=cache, key="k")
    with pytest.warns(CacheWarning, match="mean is not finite"):
        fit(again, CountingDataset(n=5))
    assert again.mean == good


def test_unwritable_cache_location_returns_stats_with_one_warning(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    norm = FitNormalize(cache=blocker / "stats.h5")  # its folder cannot exist: a file is in the way
    with pytest.warns(CacheWarning, match="fitted but not saved") as record:
        fit(norm, CountingDataset(n=5, transform=norm))
    assert len(record) == 1 and norm.mean is not None


def test_an_existing_folder_is_a_cache_and_keeps_what_else_it_holds(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    norm = FitNormalize(cache=tmp_path)
    fit(norm, CountingDataset(n=5, transform=norm))
    assert [e.key for e in list_entries(tmp_path)] == [norm.cache_key] and norm.fit_record.written
    assert (tmp_path / f"{norm.cache_key}.h5").is_file() and (tmp_path / "notes.txt").read_text() == "mine"


def test_no_cache_writes_nothing(tmp_path):
    norm = FitNormalize(cache=None)
    fit(norm, CountingDataset(n=5, transform=norm))
    default = Path(os.environ["TORCHNORMFIT_CACHE"])
    assert not default.exists()


def test_subset_fit_reports_standard_errors_that_cover_the_full_pass_and_caches_them(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    full = FitNormalize(cache=None)
    fit(full, CountingDataset(n=300, transform=full))
    subset = FitNormalize(cache=cache)
    fit(subset, CountingDataset(n=300, transform=subset), max_samples=90, seed=3)
    errors = subset.standard_errors
    assert subset._num_samples == 90 and bool((errors.mean > 0).all())
    for fitted_value, full_value, se in [(subset.mean, full.mean, errors.mean), (subset.std, full.std, errors.std)]:
        assert (torch.tensor(fitted_value) - torch.tensor(full_value)).abs().le(4 * se).all()
    again = FitNormalize(cache=cache)
    with monkeypatch.context() as patch:
        patch.setenv("NO_READS", "1")  # any sample read would raise
        fit(again, CountingDataset(n=300, transform=again), max_samples=90, seed=3, verify=0)
    assert again.mean == subset.mean
    torch.testing.assert_close(again.standard_errors.mean, errors.mean)
    other_seed = FitNormalize(cache=cache)
    fit(other_seed, CountingDataset(n=300, transform=other_seed), max_samples=90, seed=4)
    assert other_seed.mean != subset.mean and len(list_entries(cache)) == 2
