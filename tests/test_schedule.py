"""Spec §3 / §14 oracles 5–7 for the sliding-window and epoch schedules, and the ranks' slices of one global order
(the schedule alone, and through train.open_data and the loaders)."""

import itertools

import numpy as np
import pytest
import torch
from conftest import tiny_config, write_id_folder

from pipeline.schedule import (
    BatchRows,
    RankSchedule,
    SlidingWindow,
    epoch_order,
    make_schedule,
    num_windows,
)

N, W, S = 1024, 128, 16
IMAGENET = 1_281_167


def take(it, n):
    return [np.asarray(x) for x in itertools.islice(it, n)]


def buggy_windows(n, w, s, seed, count, shuffle_per_epoch):
    """The released sampler (docs/method.md §10, item 1): the modulus is len(self) = W instead of N."""
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


# -- properties of a window stream (each returns True when the property of docs/method.md §3 holds) -----------------
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


# -- ranks: one global order, every rank its slice of each global batch ---------------------------------------------
# (N, world, global batch B): N mod world != 0 with (N // world + 1) % b == 0 (49, 2, 10: a shard of 25 ids made 5
# batches of 5 on rank 0 and 4 on rank 1), B not dividing N, primes, one process
GRID = [(49, 2, 10), (50, 4, 8), (53, 3, 9), (64, 3, 12), (37, 3, 6), (97, 4, 16), (48, 1, 16)]


def global_schedules(n: int, b: int):
    """Both schedulers on n ids (window: W a little over 2 global batches, not a multiple of the world size)."""
    w = min(n, 2 * b + 3)
    return [make_schedule("epoch", n, None, None, seed=5), make_schedule("window", n, w, max(1, w // 3), seed=5)]


@pytest.mark.parametrize(("n", "world", "b"), GRID)
def test_every_rank_takes_its_slice_of_every_global_batch(n, world, b):
    for glob in global_schedules(n, b):
        ranks = [RankSchedule(glob, b, r, world) for r in range(world)]
        per_rank = b // world
        for unit in (0, 1, 7):
            whole = glob.order(unit)
            steps = len(whole) // b  # one process's drop-last batches of this unit
            orders = [rs.order(unit) for rs in ranks]
            for r, order in enumerate(orders):  # every rank runs the same number of steps: the plan's
                assert order.dtype == np.int64 and len(order) == ranks[r].unit_size == steps * per_rank
                assert ranks[r].rows == BatchRows(r * per_rank, per_rank, b)
            for k in range(steps):  # the ranks' batch k in rank-major order (the all-gather) is global batch k
                gathered = np.concatenate([o[k * per_rank:(k + 1) * per_rank] for o in orders])
                assert np.array_equal(gathered, whole[k * b:(k + 1) * b]), (glob.kind, unit, k)
            for pos in (0, per_rank - 1, len(orders[-1]) - 1):  # where a rank's sample sits in the global order
                assert whole[ranks[-1].rows.global_position(pos)] == orders[-1][pos]


def test_the_global_order_does_not_depend_on_the_world_size():
    """One process and 2, 4 ranks: the same ids, batch for batch; the world size is not an argument of the orders.
    One process's orders are those of the per-rank scheduler they replace (its rank-0-of-1 keys), so a one-process
    run visits what it did: frozen values of that scheduler (seed 5)."""
    for glob in global_schedules(96, 8):
        single = RankSchedule(glob, 8).order(3)
        for world in (2, 4):
            parts = [RankSchedule(glob, 8, r, world).order(3).reshape(-1, 8 // world) for r in range(world)]
            assert np.array_equal(np.concatenate(parts, axis=1).reshape(-1), single)
    assert RankSchedule(make_schedule("epoch", 10, None, None, seed=5), 2, 1, 2).order(0).tolist() == [6, 3, 4, 9, 8]
    assert epoch_order(10, 0, 5).tolist() == [7, 6, 1, 3, 2, 4, 0, 9, 5, 8]
    assert SlidingWindow(10, 4, 2, seed=5).window_ids(3).tolist() == [9, 1, 4, 8]


def test_epoch_order_is_a_permutation():
    order = epoch_order(1000, epoch=7, seed=1)
    assert order.dtype == np.int64 and np.array_equal(np.sort(order), np.arange(1000))
    assert np.array_equal(epoch_order(1000, 7, 1), epoch_order(1000, 7, 1))
    assert not np.array_equal(epoch_order(1000, 7, 1), epoch_order(1000, 8, 1))
    sched = make_schedule("epoch", 1000, None, None, seed=1)
    assert np.array_equal(sched.order(7), epoch_order(1000, 7, 1)) and sched.unit_size == 1000
    ranks = [RankSchedule(sched, 30, r, 3) for r in range(3)]
    assert [rs.unit_size for rs in ranks] == [33 * 10] * 3  # 1000 // 30 = 33 global batches
    seen = np.concatenate([rs.order(7) for rs in ranks])
    assert len(np.unique(seen)) == len(seen) == 990  # disjoint: the ranks split each global batch


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"world_size": 0}, "world_size"), ({"rank": 2, "world_size": 2}, "rank"), ({"world_size": 3}, "multiple")],
)
def test_invalid_rank_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        RankSchedule(make_schedule("epoch", N, None, None, seed=0), **{"batch_size": 16, **kwargs})


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


# -- the O(W) window permutation --------------------------------------------------------------------
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


def test_windows_cover_every_id_of_a_prime_set_per_pass():
    n, w, s = 4099, 256, 32
    sw = SlidingWindow(n, w, s, seed=11)
    passes = [sw.window_ids(k) for k in range(-(-n // s) + w // s)]
    assert np.array_equal(np.unique(np.concatenate(passes)), np.arange(n))  # every id, and only those


def test_a_window_costs_o_w_whatever_n():
    """N = 10¹² ids: a materialised permutation would be 8 TB; a rank's part of a window of 32,768 is computed from
    the window's positions (each rank computes the global window: O(W), not O(W/world))."""
    import time
    import tracemalloc

    def make():
        sw = SlidingWindow(10**12, 8 * 4096, 8 * 512, seed=0, reshuffle_at_wrap=True)
        return RankSchedule(make_schedule("window", 10**12, 8 * 4096, 8 * 512, seed=0, reshuffle_at_wrap=True),
                            8 * 256, rank=3, world_size=8), sw

    tracemalloc.start()
    t = time.process_time()  # this process's CPU time: other jobs on the cores do not inflate it
    rs, sw = make()
    ids = rs.order(10**6)
    elapsed, peak = time.process_time() - t, tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(np.unique(ids)) == 4096 and ids.min() >= 0 and ids.max() < 10**12
    assert np.isin(ids, sw.window_ids(10**6)).all()
    assert peak < 4 << 20 and elapsed < 2
    assert np.array_equal(ids, make()[0].order(10**6))


def test_window_state_and_checkpoint_record_the_order_generator():
    from model.checkpoint import CheckpointError, check_schedule_unchanged
    from pipeline.schedule import ORDER_GENERATOR, WINDOW_PERMUTATION

    sw = SlidingWindow(N, W, S, seed=0)
    state = sw.state_dict()
    assert state["permutation"] == WINDOW_PERMUTATION
    old = {k: v for k, v in state.items() if k != "permutation"}  # a state from the materialised permutation
    with pytest.raises(ValueError, match="permutation"):
        SlidingWindow(N, W, S, seed=0).load_state_dict(old)
    plan = {"steps_per_unit": 4, "total_steps": 40, "warmup_steps": 4}
    for kind, per_rank in (("epoch", "numpy-permutation"), ("window", "feistel-v1")):
        cfg = {"data": {"scheduler": kind}}
        new_plan = {**plan, "order": ORDER_GENERATOR[kind]}
        check_schedule_unchanged({"config": cfg, "meta": {"plan": new_plan}}, "new.pt", cfg, new_plan)
        # every older checkpoint drew per-rank shard orders: refused, naming both generators and the old commit
        legacy = {"config": cfg, "meta": {"plan": plan, "git_sha": "9aa8af7"}}  # written before the record
        recorded = {"config": cfg, "meta": {"plan": {**plan, "order": per_rank}, "git_sha": "2949ee0"}}
        for ckpt, old_order, sha in ((legacy, "numpy-permutation", "9aa8af7"), (recorded, per_rank, "2949ee0")):
            with pytest.raises(CheckpointError, match=f"old.pt drew its {kind} order with the '{old_order}' "
                                                      f"generator .*own shard.*slice of each global batch.*{sha}"):
                check_schedule_unchanged(ckpt, "old.pt", cfg, new_plan)


def test_unit_length_does_not_compute_an_order():
    from pipeline.base import ScheduleBatchSampler, unit_size

    class Sized:
        unit_size = 10**9

        def order(self, unit):
            raise AssertionError("an O(N) order was computed for a length")

    assert unit_size(Sized()) == 10**9 and len(ScheduleBatchSampler(Sized(), 256)) == 10**9 // 256
    ranks = RankSchedule(make_schedule("epoch", 10**9, None, None, seed=0), 8 * 256, rank=1, world_size=8)
    assert ranks.unit_size == 10**9 // (8 * 256) * 256


# -- ranks through train.open_data and the loaders --------------------------------------------------------------------
def _rank_units(monkeypatch, cfg, run_dir, rank: int, world: int, unit: int):
    """train.open_data as rank `rank` of `world` (the process group faked: the data path asks only rank and world)
    -> (plan, this rank's batches of `unit`: [(ids, images)])."""
    import train
    from lifecycle import RunResources
    from model import distributed as dist

    monkeypatch.setattr(dist, "rank", lambda: rank)
    monkeypatch.setattr(dist, "world", lambda: world)
    run_dir.mkdir(parents=True, exist_ok=True)
    held = RunResources()
    try:
        data = train.open_data(cfg, run_dir, torch.device("cpu"), *train.plan_data(cfg), held)
        assert len(data.loader) == data.plan.steps_per_unit  # what every rank's loop checks against its unit
        batches = [(b.ids.tolist(), b.images.double().clone()) for b in data.loader.iter_epoch(unit)]
    finally:
        held.release()
    assert len(batches) == data.plan.steps_per_unit
    return data.plan, batches


# a sample's pixels come from its own crop box and colour factors through per-sample ops; another batch size can
# change only how those ops are vectorised or threaded, i.e. the last bits (|pixel| <= 3: < 1e-5), where other
# augmentation draws move pixels by O(0.1-1)
SAME_PIXELS = 1e-4


@pytest.mark.parametrize(("n", "world", "b"), GRID[:3])
@pytest.mark.parametrize("scheduler", ["epoch", "window"])
def test_every_rank_loads_the_plans_steps_and_the_ranks_load_the_global_batches(tmp_path, monkeypatch, n, world, b,
                                                                                 scheduler):
    """Through train.open_data and the memory backend, augmentation on: every rank's loader has the plan's steps
    per unit (49 images on 2 ranks at batch 10 made rank 0's loader 5 batches long, the plan 4: 'a bug'), and the
    ranks' batches, gathered in rank order, are one process's batches: ids and pixels."""
    folder = write_id_folder(tmp_path / "d", n=n)
    data = {"batch_size": b, "scheduler": scheduler, "window": min(n, 2 * b + 3), "stride": 5}
    cfg = tiny_config(str(folder), str(tmp_path), data=data)
    plan1, single = _rank_units(monkeypatch, cfg, tmp_path / "w1", 0, 1, unit=1)
    per_rank = b // world
    ranks = [_rank_units(monkeypatch, cfg, tmp_path / f"w{world}r{r}", r, world, unit=1) for r in range(world)]
    for plan, _ in ranks:
        assert (plan.steps_per_unit, plan.total_steps) == (plan1.steps_per_unit, plan1.total_steps)
    for k, (ids, images) in enumerate(single):
        assert sum((batches[k][0] for _, batches in ranks), []) == ids
        for r, (_, batches) in enumerate(ranks):
            rows = images[r * per_rank:(r + 1) * per_rank]
            assert (batches[k][1] - rows).abs().max() < SAME_PIXELS, (k, r)


@pytest.mark.parametrize("backend", ["torch", "torch-gpu", "dali"])
def test_the_other_loaders_load_the_global_batches_on_every_rank(tmp_path, monkeypatch, backend):
    """The same for the per-image PIL path (each sample seeded by its place in the global order), the batched GPU
    path (on the CPU here) and DALI (its CPU graph); colour augmentation on the workers and, for torch, on the
    device. (FFCV's crops are keyed by the rank's part of a batch: not world-independent, see ffcv_backend.)"""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    folder = write_id_folder(tmp_path / "d", n=27)
    for color_on in (("worker", "device") if backend == "torch" else ("worker",)):
        cfg = tiny_config(str(folder), str(tmp_path), data={"batch_size": 8, "backend": backend,
                                                            "color_aug_on": color_on})
        _, single = _rank_units(monkeypatch, cfg, tmp_path / f"{color_on}1", 0, 1, unit=2)
        ranks = [_rank_units(monkeypatch, cfg, tmp_path / f"{color_on}2r{r}", r, 2, unit=2)[1] for r in (0, 1)]
        assert len(single) == 3
        for k, (ids, images) in enumerate(single):
            assert ranks[0][k][0] + ranks[1][k][0] == ids
            for r in (0, 1):
                assert (ranks[r][k][1] - images[4 * r:4 * (r + 1)]).abs().max() < SAME_PIXELS, (color_on, k, r)
