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


# -- the O(W) window permutation (issue 17 item 5) --------------------------------------------------------------------
def is_permutation(values, n):
    return values.shape == (n,) and values.dtype == np.int64 and np.array_equal(np.sort(values), np.arange(n))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 97, 1000, 1024, 4099, 65537, 100003])
def test_feistel_is_a_permutation(n):
    from pipeline.schedule import FeistelPermutation

    for key in ((0, 1, 0), (7, 1, 3), (7, 3, 3, 12)):
        p = FeistelPermutation(n, key)
        values = p(np.arange(n))
        assert is_permutation(values, n)
        assert np.array_equal(FeistelPermutation(n, key)(np.arange(n)), values)  # a pure function of (n, key)
        some = np.arange(n)[:: max(1, n // 7)]
        assert np.array_equal(p(some), values[some])  # any positions, in any number
    if n >= 97:
        assert not np.array_equal(FeistelPermutation(n, (0, 1, 0))(np.arange(n)), FeistelPermutation(n, (1, 1, 0))(
            np.arange(n)))


def reference_feistel(p, positions, fold=False):
    """The same network written with numpy arrays (an independent oracle); fold=True replaces cycle walking by
    `% n`, which is not a bijection."""
    half, mask = np.uint64(p.half), p.mask

    def encrypt(x):
        left, right = x >> half, x & mask
        for k in p.keys:
            h = (right ^ k) * np.uint64(0x9E3779B97F4A7C15)
            h ^= h >> np.uint64(31)
            h *= np.uint64(0xBF58476D1CE4E5B9)
            h ^= h >> np.uint64(29)
            left, right = right, left ^ (h & mask)
        return (left << half) | right

    y = encrypt(np.asarray(positions, np.int64).astype(np.uint64))
    if fold:
        return (y % np.uint64(p.n)).astype(np.int64)
    while (out := y >= p.n).any():
        y[out] = encrypt(y[out])
    return y.astype(np.int64)


@pytest.mark.parametrize("n", [1, 5, 1000, 65537, 10**12])
def test_feistel_kernel_equals_the_numpy_oracle(n):
    from pipeline.schedule import FeistelPermutation

    p = FeistelPermutation(n, (5, 1, 2))
    x = np.unique(np.linspace(0, n - 1, 5000).astype(np.int64))
    assert np.array_equal(p(x), reference_feistel(p, x))


def test_a_broken_bijection_fails_the_checks(monkeypatch):
    """`% n` instead of cycle walking maps two values onto one: the permutation and window checks catch it."""
    from pipeline.schedule import FeistelPermutation

    monkeypatch.setattr(FeistelPermutation, "__call__", lambda self, pos: reference_feistel(self, pos, fold=True))
    assert not is_permutation(FeistelPermutation(1000, (0, 1, 0))(np.arange(1000)), 1000)
    windows = take(SlidingWindow(1000, W, S, seed=0), 200)
    assert not (distinct_ok(windows, W) and coverage_ok(windows, 1000, W, S))


def test_feistel_looks_random():
    from pipeline.schedule import FeistelPermutation

    n = 100_000
    x = np.arange(n)
    y = FeistelPermutation(n, (3, 1, 0))(x)
    assert abs(np.corrcoef(x, y)[0, 1]) < 0.02  # no trace of the identity
    assert abs(np.corrcoef(y[:-1], y[1:])[0, 1]) < 0.02  # neighbours are unrelated
    assert (y == x).sum() < 10  # about one fixed point expected
    counts = np.bincount(y[: n // 10] * 10 // n, minlength=10)  # the first tenth spreads over all tenths
    assert counts.min() > 0.9 * n / 100 and counts.max() < 1.1 * n / 100


def test_windows_cover_every_id_of_a_prime_shard_per_pass():
    n, w, s, world = 4099 * 3, 3 * 256, 3 * 32, 3
    for rank in range(world):
        sw = SlidingWindow(n, w, s, seed=11, rank=rank, world_size=world)
        m = sw.shard_size
        passes = [sw.window_ids(k) for k in range(-(-m // (s // world)) + w // s)]
        seen = np.unique(np.concatenate(passes))
        assert np.array_equal(seen, shard_ids(n, rank, world))  # every id of the shard, and only those


def test_a_window_costs_o_w_whatever_n():
    """N = 10¹² ids: a materialised permutation would be 8 TB; a window of 4,096 is computed from its positions."""
    import time
    import tracemalloc

    tracemalloc.start()
    t = time.process_time()  # this process's CPU time: other jobs on the cores do not inflate it
    sw = SlidingWindow(10**12, 8 * 4096, 8 * 512, seed=0, rank=3, world_size=8, reshuffle_at_wrap=True)
    ids = sw.window_ids(10**6)
    elapsed, peak = time.process_time() - t, tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(np.unique(ids)) == 4096 and np.all(ids % 8 == 3) and ids.min() >= 0 and ids.max() < 10**12
    assert peak < 4 << 20 and elapsed < 2
    assert np.array_equal(ids, SlidingWindow(10**12, 8 * 4096, 8 * 512, seed=0, rank=3, world_size=8,
                                             reshuffle_at_wrap=True).window_ids(10**6))


def test_window_state_and_checkpoint_record_the_permutation():
    from model.checkpoint import CheckpointError, check_schedule_unchanged
    from pipeline.schedule import ORDER_GENERATOR, WINDOW_PERMUTATION

    sw = SlidingWindow(N, W, S, seed=0)
    state = sw.state_dict()
    assert state["permutation"] == WINDOW_PERMUTATION
    old = {k: v for k, v in state.items() if k != "permutation"}  # a state from the materialised permutation
    with pytest.raises(ValueError, match="permutation"):
        SlidingWindow(N, W, S, seed=0).load_state_dict(old)
    plan = {"steps_per_unit": 4, "total_steps": 40, "warmup_steps": 4}
    for kind in ("epoch", "window"):
        cfg = {"data": {"scheduler": kind}}
        new_plan = {**plan, "order": ORDER_GENERATOR[kind]}
        check_schedule_unchanged({"config": cfg, "meta": {"plan": new_plan}}, "new.pt", cfg, new_plan)
        legacy = {"config": cfg, "meta": {"plan": plan, "git_sha": "9aa8af7"}}  # written before the record
        if kind == "epoch":  # the epoch order did not change: old checkpoints resume
            check_schedule_unchanged(legacy, "old.pt", cfg, new_plan)
        else:
            with pytest.raises(CheckpointError, match="old.pt drew its window order with the 'numpy-permutation'"
                                                      ".*9aa8af7"):
                check_schedule_unchanged(legacy, "old.pt", cfg, new_plan)


def test_unit_length_does_not_compute_an_order():
    from pipeline.base import ScheduleBatchSampler, unit_size

    class Sized:
        unit_size = 10**9

        def order(self, unit):
            raise AssertionError("an O(N) order was computed for a length")

    assert unit_size(Sized()) == 10**9 and len(ScheduleBatchSampler(Sized(), 256)) == 10**9 // 256
    assert make_schedule("epoch", 10**9, None, None, seed=0, rank=1, world_size=8).unit_size == 125_000_000
