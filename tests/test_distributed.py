"""Fitting across real torch.distributed process groups (gloo on loopback), and partial fits."""

import logging
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
from datasets_for_tests import CountingDataset, FailingDataset
from ranks import on_ranks

from torchnormfit import FitNormalize, NotFittedError, list_entries
from torchnormfit.verification import readings_per_image

TESTS = str(Path(__file__).parent)


def _rank_fit(rank, world_size, workdir, n, fail_at):
    sys.path.insert(0, TESTS)
    warnings.simplefilter("default")  # a fork of pytest would turn CacheWarning into an error, as no user's run does
    logging.basicConfig(filename=os.path.join(workdir, f"log{rank}.txt"), level=logging.INFO, force=True)
    norm = FitNormalize(cache=os.path.join(workdir, "cache"))
    log = os.path.join(workdir, f"reads{rank}.txt")
    if fail_at is None:
        dataset = CountingDataset(n=n, transform=norm, log=log)
    else:
        dataset = FailingDataset(fail_at=fail_at, n=n, transform=norm, log=log)
    try:
        norm.fit(dataset, num_workers=0, batch_size=3, progress=False)
        return {"mean": norm.mean, "std": norm.std, "count": norm.stats.count.tolist()}
    except Exception as error:
        return {"error": f"{type(error).__name__}: {error}"}


def run_ranks(tmp_path, world_size, n, fail_at=None, start_method="fork"):
    """One process per rank: forks of this one (milliseconds), or fresh interpreters as torchrun starts ("spawn")."""
    return on_ranks(tmp_path, _rank_fit, n, fail_at, world_size=world_size, start_method=start_method)


def reads(tmp_path, world_size):
    return sorted(int(i) for r in range(world_size) if (tmp_path / f"reads{r}.txt").exists()
                  for i in (tmp_path / f"reads{r}.txt").read_text().split())


def single_process(n):
    norm = FitNormalize(cache=None)
    return norm.fit(CountingDataset(n=n, transform=norm), num_workers=0, progress=False)


@pytest.mark.parametrize(
    "world_size, n, start_method",
    # lengths not divisible by the world size; with n=2 rank 2's shard is empty
    [(2, 11, "spawn"), (3, 10, "fork"), (3, 2, "fork")],
)
def test_ranks_agree_with_a_single_process_fit_reading_each_sample_once(tmp_path, world_size, n, start_method):
    results = run_ranks(tmp_path, world_size, n, start_method=start_method)
    assert all(r == results[0] for r in results), "every rank ends with identical statistics"
    alone = single_process(n)
    torch.testing.assert_close(torch.tensor(results[0]["mean"]), torch.tensor(alone.mean), rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.tensor(results[0]["std"]), torch.tensor(alone.std), rtol=1e-12, atol=0)
    assert reads(tmp_path, world_size) == sorted(list(range(n)) * readings_per_image(n))  # every one tracked
    cached = [line for r in range(world_size) for line in (tmp_path / f"log{r}.txt").read_text().splitlines()
              if "cached" in line]
    assert len(cached) == 1 and len(list_entries(tmp_path / "cache")) == 1


def fresh_run(tmp_path, world_size, n):
    for r in range(world_size):
        (tmp_path / f"reads{r}.txt").unlink(missing_ok=True)
    (tmp_path / "rendezvous").unlink(missing_ok=True)
    return run_ranks(tmp_path, world_size, n)


def test_second_distributed_fit_is_a_hit_verified_on_rank_0_and_changed_data_refits_everywhere(tmp_path, monkeypatch):
    first = run_ranks(tmp_path, 2, 9)
    second = fresh_run(tmp_path, 2, 9)
    assert second == first
    # rank 0 verified the hit on the images both ranks tracked during the pass; rank 1 read nothing
    assert sorted(int(i) for i in (tmp_path / "reads0.txt").read_text().split()) == list(range(9))
    assert not (tmp_path / "reads1.txt").exists()
    monkeypatch.setenv("TNF_TEST_SHIFT", "0.25")  # the data change under the cache; the key cannot see it
    third = fresh_run(tmp_path, 2, 9)
    assert third[0] == third[1] and third[0]["mean"] == pytest.approx([m + 0.25 for m in first[0]["mean"]])
    verified_then_fitted = sorted(list(range(9)) * (1 + readings_per_image(9)))  # the pass reads each tracked again
    assert len(list_entries(tmp_path / "cache")) == 1 and reads(tmp_path, 2) == verified_then_fitted


def test_an_error_on_one_rank_reaches_every_rank_without_hanging(tmp_path):
    results = run_ranks(tmp_path, 3, 12, fail_at=4)  # sample 4 is in rank 1's shard
    assert "rank 1" in results[1]["error"] and "Sample 4" in results[1]["error"]
    for r in (0, 2):
        assert results[r]["error"].startswith("RuntimeError: The fit failed on rank 1 of 3")
    assert not (tmp_path / "cache").exists()


# --- partial fits ----------------------------------------------------------------------------


def test_partial_fit_over_three_pieces_equals_one_fit():
    whole = single_process(30)
    pieces = FitNormalize(cache=None)
    data = CountingDataset(n=30)
    pieces.partial_fit(torch.utils.data.Subset(data, range(0, 7)), num_workers=0, progress=False)
    pieces.partial_fit(torch.stack([data.image(i) for i in range(7, 20)]))
    pieces.partial_fit(torch.utils.data.Subset(data, range(20, 30)), num_workers=0, progress=False)
    torch.testing.assert_close(torch.tensor(pieces.mean), torch.tensor(whole.mean), rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.tensor(pieces.std), torch.tensor(whole.std), rtol=1e-9, atol=0)
    assert pieces.stats.count.tolist() == whole.stats.count.tolist()


def test_a_cache_entry_can_be_extended_on_another_day(tmp_path):
    cache = tmp_path / "cache"
    data = CountingDataset(n=20)
    FitNormalize(cache=cache, key="shards").fit(torch.utils.data.Subset(data, range(12)), num_workers=0)
    later = FitNormalize.from_cache(cache, "shards")
    later.partial_fit(torch.utils.data.Subset(data, range(12, 20)), num_workers=0).save()
    extended = FitNormalize.from_cache(cache, "shards")
    torch.testing.assert_close(torch.tensor(extended.mean), torch.tensor(single_process(20).mean), rtol=1e-12, atol=0)
    assert [e.attrs["num_samples"] for e in list_entries(cache)] == [20]


def test_partial_fit_rejects_hand_given_stats_and_save_needs_stats_and_key():
    with pytest.raises(ValueError, match="given by hand"):
        FitNormalize([0.5], [0.2], cache=None).partial_fit(torch.rand(2, 1, 3, 3))
    with pytest.raises(NotFittedError):
        FitNormalize(cache=None).save("k")
    with pytest.raises(ValueError, match="needs a cache folder and a key"):
        FitNormalize().partial_fit(torch.rand(2, 1, 3, 3)).save()


def test_partial_fit_on_a_bad_batch_names_the_image():
    batch = torch.rand(4, 3, 2, 2)
    batch[2, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="Sample 2 contains NaN"):
        FitNormalize(cache=None).partial_fit(batch)
