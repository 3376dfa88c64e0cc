"""ChannelStats: the exact merge (Chan, Golub & LeVeque) against float64 two-pass truths.

Every expected value is computed independently of the library, by the float64 two-pass reduction of
``tests/reference.py``, never with the code under test.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import truth

from torchnormfit import ChannelStats

FIELDS = ("count", "mean", "m2", "min", "max")


# --- independent references --------------------------------------------------------------------


def pixel_truth(pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The float64 two-pass truth of a ``(C, P)`` tensor (tests/reference.py)."""
    return truth([pixels[:, None]])


def mean_error(got: torch.Tensor, want: dict[str, torch.Tensor]) -> float:
    """Error of a mean, relative to the channel's magnitude (|mean| + std), so a mean near 0 is fair."""
    scale = want["mean"].abs() + want["std"]
    return float(((got - want["mean"]).abs() / scale).max())


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(((got - want).abs() / want.abs()).max())


def spread_error(got: torch.Tensor, want: dict[str, torch.Tensor], name: str) -> float:
    """Error of a var or std relative to itself; a zero spread (one pixel, a constant channel) must
    come out as zero up to float64 rounding of the mean, 1e-15 * |mean|."""
    floor = 1e-15 * want["mean"].abs()
    if name == "var":
        floor = floor.square()
    return float(((got - want[name]).abs() / (want[name] + floor)).max())


def assert_matches_truth(stats: ChannelStats, want: dict[str, torch.Tensor], tol: float) -> None:
    assert torch.equal(stats.count, want["count"])
    assert mean_error(stats.mean, want) <= tol
    assert spread_error(stats.var, want, "var") <= tol
    assert spread_error(stats.std, want, "std") <= tol
    # min and max are picked, never computed: they must be exact.
    assert torch.equal(stats.min, want["min"])
    assert torch.equal(stats.max, want["max"])


def assert_same_stats(a: ChannelStats, b: ChannelStats, tol: float = 0.0) -> None:
    """Equal bit for bit (tol 0), or equal within rounding: count, min and max exactly, the mean
    relative to the channel's magnitude (|mean| + std) and M2 relative to itself."""
    if tol == 0.0:
        for name in FIELDS:
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        return
    for name in ("count", "min", "max"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    scale = a.mean.abs() + a.std.nan_to_num(0.0)
    assert bool(((a.mean - b.mean).abs() <= tol * scale).all()), (a.mean, b.mean)
    assert bool(((a.m2 - b.m2).abs() <= tol * a.m2).all()), (a.m2, b.m2)


def random_pixels(seed: int, channels: int, num_pixels: int, dtype: torch.dtype) -> torch.Tensor:
    """Channels with very different offsets and spreads (bright, dark, narrow, wide)."""
    g = torch.Generator().manual_seed(seed)
    offset = torch.empty(channels, 1, dtype=torch.float64).uniform_(-50.0, 50.0, generator=g)
    scale = 10.0 ** torch.empty(channels, 1, dtype=torch.float64).uniform_(-3.0, 1.0, generator=g)
    x = offset + scale * torch.randn(channels, num_pixels, dtype=torch.float64, generator=g)
    return x.to(dtype)


def split(pixels: torch.Tensor, cuts: list[int], order: list[int]) -> list[torch.Tensor]:
    """Pieces of the pixel axis at ``cuts`` (empty pieces allowed), permuted by ``order``."""
    bounds = [0, *sorted(cuts), pixels.shape[1]]
    pieces = [pixels[:, a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    return [pieces[i % len(pieces)] for i in order]


def merge_all(parts: list[ChannelStats], channels: int) -> ChannelStats:
    total = ChannelStats.empty(channels)
    for part in parts:
        total = total.merge(part)
    return total


# --- the reference constructor itself -----------------------------------------------------------


def test_from_pixels_equals_torch_float64():
    x = random_pixels(0, 4, 1000, torch.float64)
    stats = ChannelStats.from_pixels(x)
    assert_matches_truth(stats, pixel_truth(x), 1e-11)
    assert stats.num_channels == 4
    for name in FIELDS:
        assert getattr(stats, name).dtype == torch.float64


def test_from_pixels_accumulates_float32_input_in_float64():
    x = random_pixels(1, 3, 5000, torch.float32)
    stats = ChannelStats.from_pixels(x)
    # The truth of the float32 values, exactly as stored, computed in float64.
    assert_matches_truth(stats, pixel_truth(x.double()), 1e-11)


def test_from_pixels_of_no_pixels_is_empty():
    stats = ChannelStats.from_pixels(torch.empty(3, 0))
    assert_same_stats(stats, ChannelStats.empty(3))


def test_population_variance_and_std_ddof0():
    stats = ChannelStats.from_pixels(torch.tensor([[1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 6.0]]))
    assert stats.var.tolist() == [1.25, 3.0]  # sum of squared deviations / n, not / (n - 1)
    assert stats.std.tolist() == [1.25**0.5, 3.0**0.5]
    assert stats.mean.tolist() == [2.5, 3.0]
    assert stats.min.tolist() == [1.0, 2.0]
    assert stats.max.tolist() == [4.0, 6.0]
    x = random_pixels(2, 2, 777, torch.float64)
    s = ChannelStats.from_pixels(x)
    assert torch.allclose(s.var, x.var(dim=1, correction=0), rtol=1e-13, atol=0)
    assert torch.allclose(s.std, x.std(dim=1, correction=0), rtol=1e-13, atol=0)
    assert not torch.allclose(s.var, x.var(dim=1, correction=1), rtol=1e-6, atol=0)


# --- the merge ----------------------------------------------------------------------------------


def test_merge_is_chans_parallel_formula_on_a_hand_example():
    a = ChannelStats.from_pixels(torch.tensor([[1.0, 2.0, 3.0]]))  # n 3, mean 2, M2 2
    b = ChannelStats.from_pixels(torch.tensor([[10.0, 20.0]]))  # n 2, mean 15, M2 50
    m = a.merge(b)
    delta = 15.0 - 2.0
    assert m.count.tolist() == [5.0]
    assert m.mean.item() == pytest.approx(2.0 + delta * 2 / 5, rel=1e-15)  # 7.2
    assert m.m2.item() == pytest.approx(2.0 + 50.0 + delta**2 * 3 * 2 / 5, rel=1e-15)  # 254.8
    assert m.mean.item() == pytest.approx(36.0 / 5, rel=1e-15)
    assert m.var.item() == pytest.approx(torch.tensor([1.0, 2, 3, 10, 20]).double().var(correction=0).item(), rel=1e-15)
    assert (m.min.item(), m.max.item()) == (1.0, 20.0)


def test_merge_weighs_by_pixel_count_not_by_part():
    one = ChannelStats.from_pixels(torch.tensor([[1.0]]))
    many = ChannelStats.from_pixels(torch.zeros(1, 999, dtype=torch.float64))
    m = one.merge(many)
    assert m.mean.item() == pytest.approx(1e-3, rel=1e-14)  # not (1 + 0) / 2
    assert m.var.item() == pytest.approx(1e-3 * (1 - 1e-3), rel=1e-12)


def test_merge_is_stable_far_from_zero():
    """Two parts with a huge common offset and a tiny spread: the naive sum-of-squares formula
    loses every digit here (E[x^2] - E[x]^2 at 1e12 vs a variance of 1); Chan's formula does not."""
    g = torch.Generator().manual_seed(3)
    x = 1e6 + torch.randn(2, 4000, dtype=torch.float64, generator=g)
    x[:, 2000:] += 0.5  # the second part a little brighter
    want = pixel_truth(x)
    merged = ChannelStats.from_pixels(x[:, :2000]).merge(ChannelStats.from_pixels(x[:, 2000:]))
    assert_matches_truth(merged, want, 1e-9)
    naive_var = x.square().mean(dim=1) - x.mean(dim=1).square()
    assert rel_error(naive_var, want["var"]) > 1e-6  # the failure mode being guarded against is real


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    channels=st.integers(1, 4),
    num_pixels=st.integers(1, 3000),
    cut_fractions=st.lists(st.floats(0.0, 1.0), min_size=0, max_size=12),
    order_seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float64, torch.float32]),
)
def test_random_split_random_order_merge_equals_two_pass_truth(seed, channels, num_pixels, cut_fractions, order_seed, dtype):
    x = random_pixels(seed, channels, num_pixels, dtype)
    cuts = [int(f * num_pixels) for f in cut_fractions]
    order = torch.randperm(len(cuts) + 1, generator=torch.Generator().manual_seed(order_seed)).tolist()
    parts = [ChannelStats.from_pixels(piece) for piece in split(x, cuts, order)]
    merged = merge_all(parts, channels)
    # from_pixels accumulates in float64 whatever the input: the merge of exact parts is exact to
    # float64 rounding for float32 input too. (batch_stats, which sums float32 batches in float32,
    # is held to 1e-6 for float32 input in test_accumulator.py.)
    assert_matches_truth(merged, pixel_truth(x.double()), 1e-9)


@settings(max_examples=60, deadline=None)
@given(seeds=st.lists(st.integers(0, 2**31 - 1), min_size=3, max_size=3), sizes=st.lists(st.integers(0, 400), min_size=3, max_size=3))
def test_merge_is_associative_and_commutative_within_rounding(seeds, sizes):
    a, b, c = (ChannelStats.from_pixels(random_pixels(s, 3, n, torch.float64)) for s, n in zip(seeds, sizes))
    assert_same_stats(a.merge(b), b.merge(a), tol=1e-12)
    assert_same_stats(a.merge(b).merge(c), a.merge(b.merge(c)), tol=1e-12)
    assert_same_stats(a.merge(b).merge(c), c.merge(a).merge(b), tol=1e-12)
    # min, max and count are exact whatever the grouping
    for name in ("count", "min", "max"):
        assert torch.equal(getattr(a.merge(b).merge(c), name), getattr(c.merge(b.merge(a)), name))


def test_empty_is_the_neutral_element():
    a = ChannelStats.from_pixels(random_pixels(4, 3, 100, torch.float64))
    empty = ChannelStats.empty(3)
    assert empty.count.tolist() == [0.0, 0.0, 0.0]
    assert_same_stats(a.merge(empty), a)  # bit for bit, not just close
    assert_same_stats(empty.merge(a), a)
    assert_same_stats(empty.merge(empty), empty)
    assert_same_stats(empty.merge(empty).merge(a).merge(empty), a)


def test_merge_returns_a_new_object_and_leaves_operands_alone():
    a = ChannelStats.from_pixels(random_pixels(5, 2, 50, torch.float64))
    b = ChannelStats.from_pixels(random_pixels(6, 2, 70, torch.float64))
    a_before, b_before = pickle.loads(pickle.dumps(a)), pickle.loads(pickle.dumps(b))
    m = a.merge(b)
    assert m is not a and m is not b
    assert_same_stats(a, a_before)
    assert_same_stats(b, b_before)


def test_merged_mean_stays_within_min_and_max():
    """The cache rejects an entry whose mean lies outside [min, max]; a merge must never produce one,
    even for a constant channel merged many times from parts of odd sizes."""
    total = ChannelStats.empty(2)
    for n in (1, 3, 7, 11, 13, 301, 1, 17):
        x = torch.empty(2, n, dtype=torch.float64)
        x[0] = 0.1
        x[1] = 1 / 3
        total = total.merge(ChannelStats.from_pixels(x))
        assert bool(((total.min <= total.mean) & (total.mean <= total.max)).all())
    assert total.mean.tolist() == [0.1, 1 / 3]


# --- constant channels --------------------------------------------------------------------------


def test_constant_channels_flags_constant_channels_and_only_those():
    g = torch.Generator().manual_seed(7)
    x = torch.rand(5, 3001, dtype=torch.float64, generator=g)
    x[1] = 0.1  # constant
    x[3] = 0.0  # constant at zero
    x[2] = 0.5 + 1e-6 * torch.randn(3001, generator=g, dtype=torch.float64)  # tiny but real spread
    x[4] = 0.7
    x[4, 1234] = 0.7 + 1e-9  # one pixel differs: not constant
    stats = merge_all([ChannelStats.from_pixels(p) for p in split(x, [17, 1000, 2999], [3, 1, 0, 2])], 5)
    assert stats.constant_channels().tolist() == [False, True, False, True, False]
    assert stats.constant_channels().dtype == torch.bool


def test_constant_channel_has_exactly_zero_variance_after_merges():
    x = torch.full((1, 1000), 0.3, dtype=torch.float32)
    stats = merge_all([ChannelStats.from_pixels(p) for p in split(x, [1, 333, 334, 900], [4, 0, 2, 1, 3])], 1)
    assert stats.var.tolist() == [0.0]
    assert stats.mean.tolist() == [float(torch.tensor(0.3, dtype=torch.float32))]
    assert stats.constant_channels().tolist() == [True]


# --- state, pickle, immutability ------------------------------------------------------------------


def test_to_dict_from_dict_round_trip():
    stats = ChannelStats.from_pixels(random_pixels(8, 3, 200, torch.float32))
    d = stats.to_dict()
    assert set(d) == set(FIELDS)
    assert all(v.dtype == torch.float64 and v.shape == (3,) for v in d.values())
    assert_same_stats(ChannelStats.from_dict(d), stats)
    # plain lists (what a JSON or HDF5 reader hands back) work too
    assert_same_stats(ChannelStats.from_dict({k: v.tolist() for k, v in d.items()}), stats)


def test_from_dict_names_missing_fields():
    d = ChannelStats.empty(2).to_dict()
    del d["m2"]
    with pytest.raises(KeyError, match="m2"):
        ChannelStats.from_dict(d)


def test_pickle_round_trip():
    stats = ChannelStats.from_pixels(random_pixels(9, 4, 300, torch.float64))
    back = pickle.loads(pickle.dumps(stats))
    assert isinstance(back, ChannelStats)
    assert_same_stats(back, stats)
    assert_same_stats(pickle.loads(pickle.dumps(ChannelStats.empty(2))), ChannelStats.empty(2))


def test_immutable():
    stats = ChannelStats.from_pixels(random_pixels(10, 2, 30, torch.float64))
    for name in (*FIELDS, "anything"):
        with pytest.raises(AttributeError, match="immutable"):
            setattr(stats, name, torch.zeros(2))
    with pytest.raises(AttributeError):
        del stats.mean


def test_does_not_alias_the_tensors_it_was_given_or_hands_out():
    """Immutability is not skin-deep: changing a tensor passed in, or one read from to_dict(),
    must not change the statistics."""
    values = {name: torch.tensor([1.0, 2.0], dtype=torch.float64) for name in FIELDS}
    stats = ChannelStats.from_dict(values)
    values["mean"].add_(100.0)
    assert stats.mean.tolist() == [1.0, 2.0]
    stats.to_dict()["mean"].add_(100.0)
    assert stats.mean.tolist() == [1.0, 2.0]


def test_repr_shows_the_numbers():
    text = repr(ChannelStats.from_pixels(torch.tensor([[1.0, 3.0]])))
    assert "channels=1" in text and "mean=[2]" in text and "std=[1]" in text


# --- errors ---------------------------------------------------------------------------------------


def test_merge_with_mismatched_channel_counts_raises_clearly():
    a, b = ChannelStats.empty(3), ChannelStats.empty(1)
    with pytest.raises(ValueError, match="1 channels into statistics of 3 channels"):
        a.merge(b)


@pytest.mark.parametrize(
    "shapes",
    [
        [(3,), (3,), (3,), (3,), (2,)],  # one field a different length
        [(2, 3)] * 5,  # not 1-D
        [()] * 5,  # scalars
    ],
)
def test_bad_shapes_raise_clearly(shapes):
    with pytest.raises(ValueError, match="1-D tensors of one length"):
        ChannelStats(*(torch.zeros(s) for s in shapes))


def test_from_pixels_rejects_a_batch_shape():
    with pytest.raises(ValueError, match=r"\(C, num_pixels\)"):
        ChannelStats.from_pixels(torch.zeros(2, 3, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_merge_across_devices():
    x = random_pixels(11, 3, 500, torch.float64)
    a = ChannelStats.from_pixels(x[:, :200].cuda())
    b = ChannelStats.from_pixels(x[:, 200:])
    merged = a.merge(b)
    assert merged.mean.device.type == "cuda"
    assert_matches_truth(merged.to("cpu"), pixel_truth(x), 1e-12)
