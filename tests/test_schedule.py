"""Spec §3 / §14 oracles 5–7 for the sliding-window and epoch schedules."""

import itertools

import numpy as np
import pytest

from pipeline.schedule import (
    SlidingWindow,
    epoch_order,
    make_schedule,
    num_windows,
    shard_ids,
)

N, W, S = 1024, 128, 16
IMAGENET = 1_281_167


def take(it, n):
    return [np.asarray(x) for x in itertools.islice(it, n)]


def buggy_windows(n, w, s, seed, count, shuffle_per_epoch):
    """The released sampler (spec §3): the modulus is len(self) = W instead of N."""
    rng = np.random.default_rng(seed)
    perm, start, out = rng.permutation(n), 0, []
    for _ in range(count):
        if shuffle_per_epoch and start + w > w:  # the released wrap check, true whenever start != 0
            perm = rng.permutation(n)
        ids = perm[(start + np.arange(w)) % w].copy()
        rng.shuffle(ids)
        out.append(ids)
        start = (start + s) % w
    return out


# -- properties of a window stream (each returns True when the spec property holds) ----------------------------------
def distinct_ok(windows, w):
    return all(len(x) == w and len(np.unique(x)) == w for x in windows)


def overlap_ok(windows, w, s):
    return all(len(np.intersect1d(a, b)) == w - s for a, b in itertools.pairwise(windows))


def coverage_ok(windows, n, w, s):
    """Over every run of n/s consecutive windows each id appears exactly w/s times."""
    span = n // s
    for first in range(len(windows) - span + 1):
        counts = np.bincount(np.concatenate(windows[first : first + span]), minlength=n)
        if not np.all(counts == w // s):
            return False
    return True


def revisit_gaps(windows):
    """Sample distances between consecutive visits of the same id in the concatenated stream."""
    stream = np.concatenate(windows)
    order = np.argsort(stream, kind="stable")  # positions grouped by id, ascending within an id
    same = stream[order][1:] == stream[order][:-1]
    return np.diff(order)[same]


def gaps_ok(windows, w):
    gaps = revisit_gaps(windows)
    short = gaps[gaps < 2 * w]
    return len(short) > 0 and 0.85 <= len(short) / len(gaps) <= 0.95 and 0.85 * w <= short.mean() <= 1.15 * w


# -- oracle 5 -------------------------------------------------------------------------------------------------------
def test_spec_window_properties():
    windows = take(SlidingWindow(N, W, S, seed=0), 4 * N // S)
    assert distinct_ok(windows, W)
    assert overlap_ok(windows, W, S)
    assert coverage_ok(windows, N, W, S)
    assert gaps_ok(windows, W)


def test_counts_when_stride_does_not_divide_n():
    n = 1000
    windows = take(SlidingWindow(n, W, S, seed=1), 200)
    for span in (62, 63):
        for first in range(0, 200 - span, 7):
            counts = np.bincount(np.concatenate(windows[first : first + span]), minlength=n)
            assert np.abs(counts - span * W / n).max() <= 1


@pytest.mark.parametrize("shuffle_per_epoch", [False, True])
def test_modulus_bug_fails_the_properties(shuffle_per_epoch):
    windows = buggy_windows(N, W, S, seed=0, count=4 * N // S, shuffle_per_epoch=shuffle_per_epoch)
    assert distinct_ok(windows, W)  # each window alone looks fine...
    assert not overlap_ok(windows, W, S)  # ...but the stream does not slide
    assert not coverage_ok(windows, N, W, S)
    assert not gaps_ok(windows, W)


def test_deterministic_per_seed_and_different_across_seeds():
    a, b, c = (take(SlidingWindow(N, W, S, seed=s), 10) for s in (3, 3, 4))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not any(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_window_ids_is_pure_and_matches_iteration():
    stream = take(SlidingWindow(N, W, S, seed=5), 70)
    fresh = SlidingWindow(N, W, S, seed=5)
    for k in (69, 0, 33):
        assert np.array_equal(fresh.window_ids(k), stream[k])
    assert fresh.window_ids(3).dtype == np.int64


# -- oracle 6 -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("epochs", "windows"), [(200, 1955), (5, 49), (400, 3910), (10, 98), (1600, 15640), (40, 391), (200 / 40, 49)]
)
def test_imagenet_epoch_accounting(epochs, windows):
    assert num_windows(epochs, IMAGENET, 131072) == windows


def test_num_windows_float_epochs_are_exact():
    assert num_windows(0.1, 10, 1) == 1  # binary 0.1 is slightly above 0.1: no spurious extra window
    assert num_windows(2.5, 100, 30) == 9
    sched = make_schedule("window", IMAGENET, 131072, 16384, seed=0)
    assert sched.units_for_epochs(200) == 1955
    assert make_schedule("epoch", 100, None, None, seed=0).units_for_epochs(2.5) == 3


# -- distributed ----------------------------------------------------------------------------------------------------
def test_rank_shards_are_disjoint_and_cover():
    shards = [shard_ids(N + 3, r, 2) for r in range(2)]
    assert len(np.intersect1d(*shards)) == 0
    assert np.array_equal(np.sort(np.concatenate(shards)), np.arange(N + 3))
    for r in range(2):
        sw = SlidingWindow(N, W, S, seed=0, rank=r, world_size=2)
        windows = take(sw, 2 * N // S)
        assert all(len(x) == W // 2 and np.all(x % 2 == r) for x in windows)
        assert distinct_ok(windows, W // 2) and overlap_ok(windows, W // 2, S // 2)
        assert coverage_ok([x // 2 for x in windows], N // 2, W // 2, S // 2)


def test_epoch_order_is_a_permutation_of_the_shard():
    for rank in range(3):
        order = epoch_order(1000, epoch=7, seed=1, rank=rank, world_size=3)
        assert order.dtype == np.int64
        assert np.array_equal(np.sort(order), shard_ids(1000, rank, 3))
    assert np.array_equal(epoch_order(1000, 7, 1), epoch_order(1000, 7, 1))
    assert not np.array_equal(epoch_order(1000, 7, 1), epoch_order(1000, 8, 1))
    sched = make_schedule("epoch", 1000, None, None, seed=1, rank=1, world_size=3)
    assert np.array_equal(sched.order(7), epoch_order(1000, 7, 1, 1, 3)) and sched.unit_size == 333


# -- oracle 7: resume -----------------------------------------------------------------------------------------------
def _plain(x):
    """True if x holds only python builtins (what torch.load(weights_only=True) accepts without numpy)."""
    if isinstance(x, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in x.items())
    if isinstance(x, list | tuple):
        return all(_plain(v) for v in x)
    return type(x) in (int, float, bool, str, type(None))


@pytest.mark.parametrize("reshuffle", [False, True])
def test_resume_reproduces_the_stream(reshuffle):
    def make():
        return SlidingWindow(N, W, S, seed=9, reshuffle_at_wrap=reshuffle)

    uninterrupted = take(make(), 80)
    first = make()
    take(first, 5)
    state = first.state_dict()
    assert state["position"] == 5 and _plain(state)
    resumed = make()
    resumed.load_state_dict(state)
    rest = take(resumed, 75)
    assert all(np.array_equal(x, y) for x, y in zip(rest, uninterrupted[5:], strict=True))
    with pytest.raises(ValueError, match="seed"):
        SlidingWindow(N, W, S, seed=10).load_state_dict(state)


def test_reshuffle_at_wrap():
    plain = SlidingWindow(N, W, S, seed=2)
    resh = SlidingWindow(N, W, S, seed=2, reshuffle_at_wrap=True)
    first_wrap = (N - W) // S + 1  # 57: the first window with start + W > N
    assert not plain.wraps(first_wrap - 1) and plain.wraps(first_wrap)
    for k in range(first_wrap):
        assert np.array_equal(resh.window_ids(k), plain.window_ids(k))
    windows = [resh.window_ids(k) for k in range(first_wrap, N // S + 3)]
    assert distinct_ok(windows, W)
    assert all(not np.array_equal(x, plain.window_ids(k)) for k, x in enumerate(windows, first_wrap))
    # after the last wrapping window the permutation it drew stays in force, so sliding resumes
    assert overlap_ok([resh.window_ids(k) for k in range(N // S, N // S + 3)], W, S)


# -- validation -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"window": 2 * N}, "window"),
        ({"stride": 0}, "stride"),
        ({"stride": 2 * W}, "stride"),
        ({"world_size": 3}, "world_size"),
        ({"rank": 2, "world_size": 2}, "rank"),
    ],
)
def test_invalid_arguments(kwargs, name):
    args = {"num_instances": N, "window": W, "stride": S, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=name):
        SlidingWindow(**args)


def test_make_schedule_window():
    sched = make_schedule("window", N, W, S, seed=4)
    assert sched.kind == "window" and sched.unit_size == W
    assert np.array_equal(sched.order(12), SlidingWindow(N, W, S, seed=4).window_ids(12))
    with pytest.raises(ValueError, match="kind"):
        make_schedule("windows", N, W, S, seed=4)
