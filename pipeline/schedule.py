"""Which instance ids each rank visits, and in which order (docs/method.md §3). numpy and one numba kernel, no torch.

The order of a unit (an epoch, or a window of the sliding-window scheduler) is one global sequence, a pure function
of (seed, unit) and of nothing else, the world size included:

- "epoch":  unit = epoch; every id once, in a seeded random order per epoch.
- "window": unit = window; the sliding window of docs/method.md §3 (W ids per window, the next window shifted
            by S along a fixed random permutation, each window freshly shuffled). The permutation is a seeded
            Feistel bijection of [0, N) evaluated only at the W positions a window needs: O(W) time and memory per
            window, O(1) state, whatever N (a materialised permutation is 8 bytes per id: 8 GB for 10⁹ ids).

Ranks (`RankSchedule`): a unit's order is cut into global batches of B = b·world ids (drop-last: ⌊unit/B⌋ of
them), and rank r takes positions [r·b, (r+1)·b) of every global batch. The ranks' ids all-gathered in rank-major
order (what the instance bank does every step) are then exactly the global batch, so the model sees the same global
batches, and the bank's recent-negative ring holds the same ids, at any world size: a run resumes at another world
size on the same trajectory, and every rank runs ⌊unit/B⌋ steps per unit whatever N mod world is.

Random streams are keyed as `default_rng([seed, TAG, 0, ...])`; the global numpy RNG is never used. (The 0 was the
rank of the per-rank orders these replace: kept, the order of a one-process run is what it was.)
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import NamedTuple, Protocol

import numpy as np
from numba import njit

# Distinct keys so the epoch orders, the window permutation and the per-window shuffles never share a random stream.
_TAG_EPOCH = 0
_TAG_PERM = 1
_TAG_SHUFFLE = 2
_TAG_REPERM = 3
_WHOLE = 0  # the stream key that was rank 0's of the per-rank orders (see the module docstring)
_SCAN_CHUNK = 4096  # windows examined per numpy pass when looking back for the last wrapping window
# The window permutation's generator, in the sampler's state: a run's remaining windows are only those it was planned
# with if the generator is the same ("numpy-permutation" was the materialised permutation before it).
WINDOW_PERMUTATION = "feistel-v1"
# The generator of each scheduler's order, recorded in checkpoints (`plan.Resolved.order`): a resume is refused
# when it differs. ORDERS says what each one was, for that refusal.
ORDER_GENERATOR = {"epoch": "global-permutation-v2", "window": "global-feistel-v2"}
ORDERS = {
    "numpy-permutation": "every rank a seeded permutation of its own shard {i : i mod world = rank} per epoch (or "
                         "window: the materialised window permutation)",
    "feistel-v1": "every rank a sliding window over a Feistel permutation of its own shard {i : i mod world = rank}",
    "global-permutation-v2": "one seeded permutation of all N ids per epoch, whatever the world size; every rank "
                             "takes its slice of each global batch",
    "global-feistel-v2": "one sliding window over a Feistel permutation of all N ids, whatever the world size; every "
                         "rank takes its slice of each global batch",
}
LEGACY_ORDER = "numpy-permutation"  # what a checkpoint without the record was trained with (either scheduler)
_FEISTEL_ROUNDS = 6
_M1, _M2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9)  # splitmix64's finaliser
_S31, _S29 = np.uint64(31), np.uint64(29)


def _rng(seed: int, tag: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), tag, _WHOLE, *(int(k) for k in keys)])


class FeistelPermutation:
    """A seeded bijection of [0, n), evaluated at any positions in O(len(positions)) time and memory.

    A balanced Feistel network of 6 rounds over the smallest even number of bits 2h with 2^(2h) >= n (so the
    domain is < 4n), each round `L, R = R, L ^ F(R, key_r)` with F a multiply-xorshift hash of R and the round key
    (splitmix64's finaliser) cut to h bits; values that land outside [0, n) are encrypted again (cycle walking),
    which keeps the map a bijection of [0, n) (fewer than 4 encryptions per value on average, every value's walk
    ends because its cycle holds the value itself). A Feistel network is a bijection whatever F is, so the
    permutation property does not depend on the hash's quality; the hash only decides how random it looks.
    The round keys are drawn from `default_rng(key)`: the permutation is a pure function of (n, key).
    """

    def __init__(self, n: int, key: tuple[int, ...]) -> None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n = int(n)
        bits = max(2, (self.n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = np.random.default_rng(list(key)).integers(0, 2**63, size=_FEISTEL_ROUNDS, dtype=np.uint64)

    def __call__(self, positions) -> np.ndarray:
        """int64 [len(positions)]: the permutation's values at `positions` (each in [0, n))."""
        x = np.asarray(positions, dtype=np.int64)
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise ValueError(f"positions must be in [0, {self.n})")
        out = np.empty(x.size, np.int64)
        _feistel(x.ravel(), np.uint64(self.n), np.uint64(self.half), self.mask, self.keys, out)
        return out.reshape(x.shape)


@njit(cache=True)
def _feistel(positions, n, half, mask, keys, out):  # 50-90 ns a value on the 2-core VM (numpy arrays: 150-500)
    for i in range(positions.shape[0]):
        x = np.uint64(positions[i])
        while True:  # cycle walking: encrypt again until the value is in [0, n)
            left, right = x >> half, x & mask
            for r in range(keys.shape[0]):
                h = (right ^ keys[r]) * _M1
                h ^= h >> _S31
                h *= _M2
                h ^= h >> _S29
                left, right = right, left ^ (h & mask)
            x = (left << half) | right
            if x < n:
                break
        out[i] = np.int64(x)


def epoch_order(num_instances: int, epoch: int, seed: int) -> np.ndarray:
    """int64 [N]: all ids in a random order that is a pure function of (seed, epoch)."""
    if num_instances < 1:
        raise ValueError(f"num_instances must be >= 1, got {num_instances}")
    return _rng(seed, _TAG_EPOCH, epoch).permutation(np.arange(num_instances, dtype=np.int64))


def num_windows(epochs: float, num_instances: int, window: int) -> int:
    """ceil(E·N/W): windows that hold E epochs of samples (docs/method.md §3; use it for the warm-up too, E = E_wu).

    Exact rational arithmetic, so float epochs such as 200/40 = 5.0 or 0.1 do not pick up a spurious +1.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    e = Fraction(str(epochs)) if isinstance(epochs, float) else Fraction(epochs)
    return math.ceil(e * num_instances / window)


class SlidingWindow:
    """The sliding-window scheduler of docs/method.md §3, over all N ids.

    Window k:
        positions (k·S + j) mod N for j in [0, W) of a fixed permutation `perm` of [0, N) (seeded),
        then shuffled with a generator seeded by (seed, k).
    So `window_ids(k)` is a pure function of (seed, k) and resuming needs only the next window index.
    `perm` is a `FeistelPermutation` of [0, N) keyed by the seed, evaluated at the window's W positions only:
    O(W) time and memory per window and nothing of size N held.

    reshuffle_at_wrap (docs/method.md §3, an option; default off): before every window that would wrap
    (k·S mod N + W > N) the permutation is redrawn. The draw is keyed by the index of that window, so the
    permutation in force at window k is the one drawn at the last wrapping window ≤ k (or the seed's permutation
    before the first wrap).
    This keeps the flag a pure function of (seed, k) as well: nothing but the position is checkpointed.

    Iterating (`next(sw)` / `for ids in sw`) yields windows `position, position+1, ...` forever and advances
    `position`; `state_dict()` after consuming k windows therefore resumes at window k.
    """

    def __init__(self, num_instances: int, window: int, stride: int, seed: int,
                 reshuffle_at_wrap: bool = False) -> None:
        if num_instances < 1:
            raise ValueError(f"num_instances must be >= 1, got {num_instances}")
        if not 1 <= window <= num_instances:
            raise ValueError(f"window must be in [1, num_instances {num_instances}], got window={window}")
        if not 1 <= stride <= window:
            raise ValueError(f"stride must be in [1, window {window}], got stride={stride}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.num_instances, self.window, self.stride = int(num_instances), int(window), int(stride)
        self.seed = int(seed)
        self.reshuffle_at_wrap = bool(reshuffle_at_wrap)
        self.position = 0  # index of the next window `__next__` returns
        self._perm = FeistelPermutation(self.num_instances, (self.seed, _TAG_PERM, _WHOLE))

    # -- pure part -------------------------------------------------------------------------------------------
    def start(self, index: int) -> int:
        """Position in the permutation where window `index` begins."""
        return (int(index) * self.stride) % self.num_instances

    def wraps(self, index: int) -> bool:
        """Whether window `index` runs past the end of the permutation."""
        return self.start(index) + self.window > self.num_instances

    def perm_ids(self, positions, index: int = 0) -> np.ndarray:
        """int64: the ids at `positions` of the permutation in force at window `index` (perm[positions])."""
        return self._perm_for(index)(positions)

    def window_ids(self, index: int) -> np.ndarray:
        """int64 [W]: the ids of window `index`, in visiting order."""
        if index < 0:
            raise ValueError(f"window index must be >= 0, got {index}")
        pos = (self.start(index) + np.arange(self.window, dtype=np.int64)) % self.num_instances
        ids = self.perm_ids(pos, index)
        _rng(self.seed, _TAG_SHUFFLE, index).shuffle(ids)
        return ids

    def _perm_for(self, index: int) -> FeistelPermutation:
        if not self.reshuffle_at_wrap:
            return self._perm
        j = self._last_wrap_at_or_before(index)
        if j < 0:
            return self._perm
        return FeistelPermutation(self.num_instances, (self.seed, _TAG_REPERM, _WHOLE, j))

    def _last_wrap_at_or_before(self, index: int) -> int:
        """Largest j ≤ index whose window wraps, or -1 if none."""
        n, w, s = self.num_instances, self.window, self.stride
        # Starts are multiples of g = gcd(n, S); the largest is n - g, so some window wraps iff W > g.
        if w <= math.gcd(n, s):
            return -1
        hi = int(index)
        while hi >= 0:  # usually ends in the first chunk: with S < W every pass round the permutation wraps once
            js = np.arange(hi, max(hi - _SCAN_CHUNK, -1), -1, dtype=np.int64)
            hit = np.flatnonzero((js * s) % n + w > n)
            if hit.size:
                return int(js[hit[0]])
            hi -= _SCAN_CHUNK
        return -1

    # -- iteration and checkpointing -----------------------------------------------------------------------------
    def __iter__(self) -> SlidingWindow:
        return self

    def __next__(self) -> np.ndarray:
        index = self.position
        self.position += 1
        return self.window_ids(index)

    def _config(self) -> dict:
        return {
            "num_instances": self.num_instances,
            "window": self.window,
            "stride": self.stride,
            "seed": self.seed,
            "reshuffle_at_wrap": self.reshuffle_at_wrap,
            "permutation": WINDOW_PERMUTATION,
        }

    def state_dict(self) -> dict:
        """Plain python ints/bools only (safe for torch.load(weights_only=True))."""
        return {"position": int(self.position), **self._config()}

    def load_state_dict(self, state: dict) -> None:
        """Restore `position`; the configuration must match the one this object was built with."""
        mismatched = {k: (v, state.get(k)) for k, v in self._config().items() if state.get(k) != v}
        if mismatched:
            raise ValueError(f"sliding-window state does not match this configuration (mine, saved): {mismatched}")
        self.position = int(state["position"])


class Schedule(Protocol):
    """What the training loop needs: the ids of unit (epoch or window) `unit`, as a pure function of it."""

    kind: str
    unit_size: int  # ids per unit (of this rank, for a RankSchedule)

    def order(self, unit: int) -> np.ndarray:
        """int64 [unit_size]: the ids of unit `unit`, in visiting order."""
        ...

    def units_for_epochs(self, epochs: float) -> int:
        """Units that hold `epochs` epochs of samples."""
        ...


class EpochSchedule:
    """Epoch-based schedule: unit = epoch = one pass over all N ids."""

    kind = "epoch"

    def __init__(self, num_instances: int, seed: int) -> None:
        if num_instances < 1:
            raise ValueError(f"num_instances must be >= 1, got {num_instances}")
        self.num_instances, self.seed = num_instances, seed
        self.unit_size = num_instances

    def order(self, unit: int) -> np.ndarray:
        return epoch_order(self.num_instances, unit, self.seed)

    def units_for_epochs(self, epochs: float) -> int:
        return math.ceil(epochs)


class WindowSchedule:
    """Sliding-window schedule: unit = window (docs/method.md §3)."""

    kind = "window"

    def __init__(self, sampler: SlidingWindow) -> None:
        self.sampler = sampler
        self.unit_size = sampler.window

    def order(self, unit: int) -> np.ndarray:
        return self.sampler.window_ids(unit)

    def units_for_epochs(self, epochs: float) -> int:
        return num_windows(epochs, self.sampler.num_instances, self.sampler.window)


class BatchRows(NamedTuple):
    """The rows [start, start + count) of every global batch of `total` ids that one rank holds."""

    start: int
    count: int
    total: int

    @staticmethod
    def whole(batch_size: int) -> BatchRows:
        """A process that holds its whole batch (one process, or a schedule used without ranks)."""
        return BatchRows(0, int(batch_size), int(batch_size))

    def global_position(self, position: int) -> int:
        """Position in the unit's global order of position `position` of this rank's order."""
        k, j = divmod(int(position), self.count)
        return k * self.total + self.start + j


class RankSchedule:
    """One rank's part of a global schedule: its rows of every global batch (see the module docstring).

    order(unit) = global[k·B + r·b : k·B + (r+1)·b] for k < ⌊unit/B⌋, concatenated: exactly ⌊unit/B⌋·b ids, so a
    loader that cuts it into batches of b (drop-last) yields ⌊unit/B⌋ batches on every rank, and its batch k is the
    rank's slice of global batch k. The global tail (unit mod B ids) is left out, as one process drops it.
    """

    def __init__(self, schedule: Schedule, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(f"the global batch ({batch_size}) must be a positive multiple of world_size "
                             f"({world_size})")
        b = batch_size // world_size
        self.inner, self.kind = schedule, schedule.kind
        self.rank, self.world_size = int(rank), int(world_size)
        self.rows = BatchRows(self.rank * b, b, int(batch_size))
        self.batches = schedule.unit_size // batch_size  # steps per unit, on every rank
        self.unit_size = self.batches * b

    def order(self, unit: int) -> np.ndarray:
        """int64 [⌊unit/B⌋·b]: this rank's ids of unit `unit`, batch after batch."""
        rows = self.rows
        full = np.asarray(self.inner.order(unit), dtype=np.int64)[:self.batches * rows.total]
        return np.ascontiguousarray(full.reshape(self.batches, rows.total)[:, rows.start:rows.start + rows.count]
                                    ).reshape(-1)

    def global_order(self, unit: int) -> np.ndarray:
        """int64: the unit's whole order (every rank's)."""
        return np.asarray(self.inner.order(unit), dtype=np.int64)

    def units_for_epochs(self, epochs: float) -> int:
        return self.inner.units_for_epochs(epochs)


def batch_rows(schedule, batch_size: int) -> BatchRows:
    """The rows of each global batch that a loader of `schedule` with batches of `batch_size` holds."""
    rows = getattr(schedule, "rows", None)
    if rows is None:
        return BatchRows.whole(batch_size)
    if rows.count != batch_size:
        raise ValueError(f"the schedule gives this rank {rows.count} ids of every global batch, the loader asks "
                         f"batches of {batch_size}")
    return rows


def make_schedule(kind: str, num_instances: int, window: int | None, stride: int | None, seed: int,
                  reshuffle_at_wrap: bool = False) -> Schedule:
    """Build the global "epoch" or "window" schedule (window/stride ignored for "epoch"); `RankSchedule` gives a
    rank its part."""
    if kind == "epoch":
        return EpochSchedule(num_instances, seed)
    if kind == "window":
        if window is None or stride is None:
            raise ValueError("kind='window' needs window and stride")
        return WindowSchedule(SlidingWindow(num_instances, window, stride, seed, reshuffle_at_wrap))
    raise ValueError(f"kind must be 'epoch' or 'window', got {kind!r}")
