"""Fitting on streams: real WebDataset tar shards and real Hugging Face datasets built in tmp_path.

Exact statistics with and without workers, every sample once (also across 2
gloo ranks), unsplit streams refused, cache hits in a second process without
key=, the command line on shards.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import streams_for_tests as st
import torch
import torch.multiprocessing as mp
from ranks import on_ranks

from torchnormfit import CacheWarning, FitNormalize, list_entries
from torchnormfit.cli import main
from torchnormfit.key import describe_dataset, fingerprint
from torchnormfit.passes import Capture, first_images, stream_workers
from torchnormfit.passes.streamed import SHARD_SPAN, tracked_images

pytest.importorskip("webdataset")
pytest.importorskip("datasets")

TESTS = str(Path(__file__).parent)
N, SHARDS = 24, 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return st.write_shards(tmp_path_factory.mktemp("shards"), N, SHARDS)


class Images(torch.utils.data.Dataset):
    """The same images as a map-style dataset: the reference pass."""

    def __init__(self, indices):
        self.indices = list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        return st.image(self.indices[index])


def assert_exact(norm: FitNormalize, indices) -> None:
    """Every pixel counted once; the map-style pass's statistics within 1e-12; the float64 truth within 1e-6.

    1e-6, not 1e-9: the accumulator reduces each float32 image in float32 and, where the rounding allows it,
    uncentred (its documented bound, ``batch_stats``: within 1e-6), for map-style data too.
    """
    mean, var, pixels = st.truth(indices)
    assert norm.stats.count.tolist() == [float(pixels)] * 3
    assert norm.num_samples == len(list(indices))
    torch.testing.assert_close(norm.stats.mean, mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(norm.stats.var, var, rtol=1e-6, atol=0)
    reference = FitNormalize(cache=None).fit(Images(indices), num_workers=0, progress=False).stats
    for field, value in reference.to_dict().items():
        torch.testing.assert_close(getattr(norm.stats, field), value, rtol=1e-12, atol=0, msg=field)


def fit(dataset_of, workers, **options) -> FitNormalize:
    norm = FitNormalize(cache=None)
    return norm.fit(dataset_of(norm), num_workers=workers, progress=False, **options)


@pytest.mark.parametrize("workers", [0, 2])
def test_webdataset_is_exact_with_the_fitnormalize_in_map_tuple(shards, workers):
    assert_exact(fit(lambda norm: st.webdataset(shards, norm), workers), range(N))


@pytest.mark.parametrize("workers", [0, 2])
def test_huggingface_map_style_with_set_transform_is_exact(workers):
    assert_exact(fit(lambda norm: st.hf_dataset(N, norm), workers), range(N))


@pytest.mark.parametrize("workers", [0, 2])
def test_huggingface_iterable_is_exact_with_the_fitnormalize_in_map(workers):
    assert_exact(fit(lambda norm: st.hf_iterable(N, shards=4, norm=norm), workers), range(N))


@pytest.mark.parametrize("workers", [0, 2])
def test_own_iterable_dataset_split_with_get_worker_info_is_exact(workers):
    assert_exact(fit(lambda norm: st.Stream(range(N), transform=norm), workers, batch_size=5), range(N))


def test_a_worker_with_an_empty_part_is_fine():
    # 1 sample for 2 workers: worker 1 gets none
    assert_exact(fit(lambda norm: st.Stream(range(1), transform=norm), 2), range(1))


@pytest.mark.parametrize("workers", [None, 2, 3])
def test_a_webdataset_with_one_shard_works_under_any_worker_count(shards, workers):
    """WebDataset refuses a worker that finds no samples (its empty_check, on by default): the pass starts no more
    workers than shards, the default worker count included."""
    assert_exact(fit(lambda norm: st.webdataset(shards[:1], norm, empty_check=True), workers), range(6))


def test_workers_are_capped_at_the_shards_a_stream_says_it_has(shards):
    assert stream_workers(st.webdataset(shards), 8) == SHARDS
    assert stream_workers(st.webdataset(shards[:1]), None) == 1
    assert stream_workers(st.hf_iterable(N, shards=3), 8) == 3
    assert stream_workers(st.Stream(range(N)), 8) == 8  # says nothing: as asked
    assert stream_workers(st.webdataset(shards), 0) == 0


@pytest.mark.parametrize("make", [st.unsplit_webdataset, lambda urls: st.Stream(range(N), split=False)])
def test_a_stream_not_split_across_workers_is_refused(shards, make):
    with pytest.raises(ValueError, match="workers 0 and 1 both started the stream with the same .* not split") as info:
        FitNormalize(cache=None).fit(make(shards), num_workers=2, progress=False)
    assert "get_worker_info()" in str(info.value) and "split_by_worker" in str(info.value)


def test_max_samples_is_the_first_n_of_the_stream_without_standard_errors(shards):
    norm = fit(lambda norm: st.webdataset(shards, norm), 2, max_samples=7)
    assert_exact(norm, range(7))
    assert norm.standard_errors is None


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bad_sample_is_named(workers):
    stream = st.Stream(range(N), fail_at=5)
    with pytest.raises(OSError, match="broken sample 5") as info:
        FitNormalize(cache=None).fit(stream, num_workers=workers, progress=False, batch_size=4)
    where = "Sample 5: " if workers == 0 else "Sample 2 of DataLoader worker 1's part of the stream: "
    assert str(info.value).startswith(where)


def test_progress_bar_has_a_total_only_when_the_stream_has_a_length(capsys):
    FitNormalize(cache=None).fit(st.Stream(range(N)), num_workers=0, progress=True)
    assert f"{N}/{N}" not in capsys.readouterr().err
    FitNormalize(cache=None).fit(st.SizedStream(range(N)), num_workers=0, progress=True)
    assert f"{N}/{N}" in capsys.readouterr().err


def test_first_images_reads_the_first_n_captured_or_found(shards):
    norm = FitNormalize(cache=None)
    norm._capture = capture = Capture()  # as during a fit: the FitNormalize hands its input over
    captured = first_images(st.webdataset(shards, norm), 3, capture=capture)
    found = first_images(st.webdataset(shards), 3)
    for images in (captured, found):
        assert len(images) == 3 and all(torch.equal(x, st.image(i)) for i, x in enumerate(images))
    assert len(first_images(st.Stream(range(2)), 5)) == 2


SLOW_STREAM = """
import sys, time
sys.path.insert(0, {tests!r})
import streams_for_tests as st
from torchnormfit import FitNormalize

def slow(x):
    time.sleep(0.01)
    return x

norm = FitNormalize(cache={cache!r})
print("started", flush=True)
norm.fit(st.Stream(range(5000), transform=slow), num_workers=2, batch_size=8, progress=False)
"""


def test_ctrl_c_during_a_stream_fit_writes_nothing_and_leaves_no_worker(tmp_path):
    from test_interrupts import processes_in_group

    cache = tmp_path / "cache"
    child = subprocess.Popen([sys.executable, "-c", SLOW_STREAM.format(tests=TESTS, cache=str(cache))],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert child.stdout.readline().strip() == "started"
    time.sleep(2.0)
    os.killpg(child.pid, signal.SIGINT)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode != 0 and "KeyboardInterrupt" in stderr
    assert not cache.exists()
    deadline = time.monotonic() + 10
    while processes_in_group(child.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_in_group(child.pid) == []


# --- keys ----------------------------------------------------------------------------------------


def key(dataset, norm) -> str:
    return fingerprint(dataset, norm, {})


def test_webdataset_key_sees_shards_files_and_stages(shards, tmp_path):
    norm = FitNormalize(cache=None)
    base = key(st.webdataset(shards, norm), norm)
    assert key(st.webdataset(shards, norm), norm) == base
    assert key(st.webdataset(shards[:3], norm), norm) != base
    assert key(st.webdataset(shards, norm).map(lambda s: s), norm) != base
    assert key(st.webdataset(shards, norm, shardshuffle=10), norm) != base
    copied = st.write_shards(tmp_path / "copy", N, SHARDS)
    before = key(st.webdataset(copied, norm), norm)
    with open(copied[0], "ab") as f:
        f.write(b"\0" * 512)  # a changed shard: its size and mtime
    assert key(st.webdataset(copied, norm), norm) != before
    described = json.dumps(describe_dataset(st.webdataset(shards)))
    assert all(os.path.realpath(p) in described for p in shards[:4])


def test_huggingface_key_ignores_the_fitnormalize_state_and_sees_the_data(tmp_path):
    norm = FitNormalize(cache=None)
    base = key(st.hf_dataset(N, norm), norm)
    fitted = FitNormalize([0.5] * 3, [0.2] * 3, cache=tmp_path / "other.h5")
    assert key(st.hf_dataset(N, fitted), fitted) == base
    assert key(st.hf_dataset(N - 1, norm), norm) != base
    plain = st.hf_table(N)
    assert describe_dataset(plain)["huggingface"] == plain._fingerprint


def test_huggingface_iterable_key_is_derived_from_its_shards_and_map_function():
    norm = FitNormalize(cache=None)
    base = key(st.hf_iterable(N, 4, norm), norm)
    assert key(st.hf_iterable(N, 4, norm), norm) == base
    assert key(st.hf_iterable(N - 1, 4, norm), norm) != base
    assert key(st.hf_iterable(N, 4, norm).map(lambda e: e), norm) != base
    assert "huggingface_iterable" in describe_dataset(st.hf_iterable(N, 4))


HIT = """
import json, sys
sys.path.insert(0, {tests!r})
import streams_for_tests as st
from torchnormfit import FitNormalize
norm = FitNormalize(cache={cache!r})
dataset = st.webdataset({shards!r}, norm) if {kind!r} == "webdataset" else st.hf_dataset({n}, norm)
norm.fit(dataset, num_workers=0, progress=False, verify=int(sys.argv[1]) if len(sys.argv) > 1 else None)
record = norm.fit_record
checked = None if record.verification is None else [record.verification.samples, record.verification.passed]
print(json.dumps({{"key": norm.cache_key, "mean": norm.mean, "std": norm.std, "source": record.source,
                  "checked": checked}}))
"""


@pytest.mark.parametrize("kind", ["webdataset", "huggingface"])
def test_a_second_process_hits_the_cache_without_key(shards, tmp_path, kind):
    script = HIT.format(tests=TESTS, cache=str(tmp_path / "cache"), shards=shards, kind=kind, n=N)

    def run(*verify, **env):
        done = subprocess.run([sys.executable, "-c", script, *verify], capture_output=True, text=True,
                              env={**os.environ, **env}, timeout=120)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    first = run()
    assert first["source"] == "pass"
    unverified = run("0", NO_READS="1")  # no sample read: the statistics came from the cache
    verified = run()  # the first images of the stream (or the tracked samples) read again and checked
    assert unverified["source"] == verified["source"] == "cache" and verified["checked"][1] is True
    assert unverified["checked"] is None and verified["checked"][0] == min(N, 64)
    for hit in (unverified, verified):
        assert (hit["key"], hit["mean"], hit["std"]) == (first["key"], first["mean"], first["std"])


# --- the images a hit reads again: the head, or random shards -------------------------------------


def rewrite_shard(path: str, first: int, count: int, gain: float) -> None:
    """Write a shard again with every image times ``gain``: same members, same size, same mtime (no key sees it)."""
    import webdataset as wds

    stat = os.stat(path)
    with wds.TarWriter(path) as sink:
        for i in range(first, first + count):
            sink.write({"__key__": f"{i:06d}", "npy": (st.image(i) * gain).numpy(), "cls": i})
    assert os.stat(path).st_size == stat.st_size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def fit_stream(dataset, norm):
    norm.fit(dataset, num_workers=0, progress=False)
    return norm.fit_record


def test_a_webdataset_hit_rereads_random_shards_and_sees_the_second_half_rewritten(tmp_path):
    """4 shards of 30: the entry tracks the first 16 images of each; a hit reads 44 of them, shard by shard in a
    random order, so at least one of the last two shards is read. The stream's first 44 images (what a hit read
    before) lie in the first two shards."""
    urls = st.write_shards(tmp_path / "shards", 120, 4)
    cache = tmp_path / "cache"
    norm = FitNormalize(cache=cache)
    first = fit_stream(st.webdataset(urls, norm), norm)
    (entry,) = list_entries(cache)
    keys = entry.arrays["index"].tolist()
    assert sorted({key // SHARD_SPAN for key in keys}) == [0, 1, 2, 3] and len(keys) == 64
    assert sorted(key % SHARD_SPAN for key in keys) == sorted(list(range(16)) * 4)
    assert entry.attrs["deterministic"] == 1 and np.array_equal(entry.arrays["mean_again"], entry.arrays["mean"])
    hit = FitNormalize(cache=cache)
    record = fit_stream(st.webdataset(urls, hit), hit)
    assert record.source == "cache" and record.verification.passed and record.verification.samples == 44
    for shard in (2, 3):
        rewrite_shard(urls[shard], 30 * shard, 30, gain=1.5)
    changed = FitNormalize(cache=cache)
    with pytest.warns(CacheWarning, match="does not match the data: of 44 images read again, the identical test"):
        record = fit_stream(st.webdataset(urls, changed), changed)
    assert record.key == first.key and record.source == "pass" and record.verification.failed[0] == "identical"
    truth = torch.cat([st.image(i).double().reshape(3, -1) * (1.5 if i >= 60 else 1.0) for i in range(120)], dim=1)
    assert changed.mean == pytest.approx(truth.mean(dim=1).tolist(), rel=1e-6)


def test_a_sharded_huggingface_stream_tracks_the_heads_of_its_shards():
    tracked = tracked_images(st.hf_iterable(80, 4), 64, None, lambda example: example["image"])
    assert sorted({key // SHARD_SPAN for key in tracked}) == [0, 1, 2, 3] and len(tracked) == 64
    assert all(len(readings) == 2 and readings[0] == readings[1] for readings in tracked.values())
    first_of_shard_2 = st.image(40)  # to_iterable_dataset(num_shards=4) keeps the order: shard 2 starts at 40
    assert tracked[2 * SHARD_SPAN][0][0] == pytest.approx(first_of_shard_2.double().mean(dim=(1, 2)).tolist())


def test_a_plain_stream_tracks_its_head():
    tracked = tracked_images(st.Stream(range(100)), 64, None, None)
    assert sorted(tracked) == list(range(64))
    assert tracked[5][1][0] == pytest.approx(st.image(5).double().mean(dim=(1, 2)).tolist())


# --- torch.distributed ---------------------------------------------------------------------------


def _rank_fits(rank, world_size, workdir, shards):
    """One torchrun-like rank: RANK/WORLD_SIZE set, DataLoader workers forked; each stream's fit or error."""
    sys.path.insert(0, TESTS)
    import webdataset as wds
    from datasets.distributed import split_dataset_by_node

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size))
    mp.set_start_method("fork", force=True)  # as in a process torchrun starts (spawn's children inherit spawn)
    streams = {
        "webdataset": (lambda norm: st.webdataset(shards, norm, nodesplitter=wds.split_by_node), 2),
        "huggingface": (lambda norm: split_dataset_by_node(st.hf_iterable(N, 4, norm), rank, world_size), 2),
        "empty_on_rank_1": (lambda norm: st.Stream(range(N) if rank == 0 else [], transform=norm), 0),
        "not_split": (lambda norm: st.hf_iterable(N, 4, norm), 0),
    }
    results = {}
    for name, (make, workers) in streams.items():
        norm = FitNormalize(cache=None)
        try:
            norm.fit(make(norm), num_workers=workers, progress=False)
        except ValueError as error:
            results[name] = str(error)
            continue
        results[name] = {"stats": {k: v.tolist() for k, v in norm.stats.to_dict().items()},
                         "num_samples": norm.num_samples}
    return results


def test_two_gloo_ranks_equal_one_process_each_sample_once(shards, tmp_path):
    results = on_ranks(tmp_path, _rank_fits, shards, start_method="spawn")
    assert results[0] == results[1], "every rank ends with identical statistics"
    unsplit = results[0].pop("not_split")
    assert unsplit.startswith("Ranks 0 and 1 both started the stream with the same samples: it is not split")
    assert "split_dataset_by_node" in unsplit
    alone = fit(lambda norm: st.Stream(range(N), transform=norm), 0)
    for name, result in results[0].items():
        assert result["num_samples"] == N, name
        for field, values in result["stats"].items():
            torch.testing.assert_close(torch.tensor(values, dtype=torch.float64), getattr(alone.stats, field),
                                       rtol=1e-12, atol=0, msg=f"{name}: {field}")


# --- command line --------------------------------------------------------------------------------


def test_cli_fits_shard_patterns_like_the_same_images_in_a_folder(tmp_path, capsys):
    import webdataset as wds

    (tmp_path / "shards").mkdir()
    (tmp_path / "folder").mkdir()
    rng = np.random.default_rng(0)
    for s in range(2):
        with wds.TarWriter(str(tmp_path / "shards" / f"train-{s:06d}.tar")) as sink:
            for i in range(5):
                picture = PIL.Image.fromarray(rng.integers(0, 256, size=(6 + i, 7, 3), dtype=np.uint8))
                sink.write({"__key__": f"{s}-{i}", "png": picture, "cls": i})
                picture.save(tmp_path / "folder" / f"{s}-{i}.png")
    pattern = str(tmp_path / "shards" / "train-{000000..000001}.tar")
    options = ["--cache", str(tmp_path / "cache"), "--json", "--no-progress", "--workers", "2"]
    reports = []
    for source in (pattern, str(tmp_path / "folder"), pattern):
        assert main(["fit", source, *options]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    shards, folder, again = reports
    assert shards["num_samples"] == 10 and shards["channels"] == ["R", "G", "B"] and not shards["cached"]
    for field in ("mean", "std", "min", "max", "pixels_per_channel"):
        torch.testing.assert_close(torch.tensor(shards[field]), torch.tensor(folder[field]), rtol=1e-12, atol=0)
    assert again["cached"] and again["key"] == shards["key"] != folder["key"]
    assert main(["fit", str(tmp_path / "shards" / "train-{000000..000003}.tar"), *options]) == 1
    assert "2 of the 4 shards" in capsys.readouterr().err
    assert main(["fit", pattern, "--max-samples", "3", *options]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["num_samples"] == 3 and first["first_of_stream"] and first["subset"] is None
    with pytest.raises(SystemExit):
        main(["fit", pattern, "--max-samples", "3", "--seed", "1"])
    assert "--max-samples N fits the first N samples" in capsys.readouterr().err
