"""The recent-negative rows kept on the compute device, so that a step reads and writes B bank rows, not K + B.

Why it is exact. With recent-negative sampling the candidates of step t are C_t = batch_t ∪ ring_t, where the ring
holds the ids of the previous ceil(K/B) batches. ring_{t+1} = ring_t − (its oldest batch) + batch_t ⊂ C_t, so every
row in the ring took part in the previous step: it is up to date, needs no correction, and its newest value is the
one that step just computed. So this cache keeps W and momentum of the ring's rows on the compute device, slot for
slot with the ring ([K, D] each, in the row math's dtype, fp32), and the bank itself is only touched by
  * the B rows of the batch that are not in the ring (gathered, brought up to date by the closed-form correction)
  * the rows that leave the ring (written back with last = the step that updated them).
Per step that is B rows in and ≤ B rows out (PCIe for a host bank, page cache / disk for an mmap one) instead of
K + B each way, and the correction runs on B rows instead of K + B. The logits, targets and updates are the same
numbers as without the cache (tests/test_recent_rows.py compares them bit for bit), with two stated differences:
  * low-precision rows (bf16 / fp16) are rounded once when they leave the ring, not after every step in it, so the
    cache keeps small updates that a per-step rounding would lose (closer to the fp32 trajectory, not bit-equal to
    the uncached bf16 one);
  * a step skipped for a non-finite loss applies the zero-gradient update to the candidate rows at once (momentum
    and weight decay, as the exact closed-form correction would later), instead of leaving them to be corrected
    lazily; with pic.correction=none they stay unchanged, as without the cache; with pic.correction=const (an
    approximation that replays a constant lr) the cache applies the skipped step's own lr.

Deferred write-back. The rows leaving the ring at step t are written to the bank at the end of step t + lag; until
then a gather looks them up here first (`EvictionQueue.lookup`). On CUDA with a host bank the rows go to pinned host
memory with a non-blocking copy and an event, and the host-side scatter waits on an event `lag` steps old: the loop
never waits for the step it just queued; the wait only bounds how far the host runs ahead of the GPU (lag steps).
Ranks that do not write (a shared bank's non-writers) keep the rows for lookups only. The checkpoint flushes the
queue and the whole cache into the bank first (`flush`), and saves the cache itself (exact resume with bf16 rows).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

WRITEBACK_LAG = 2  # steps between a row leaving the ring and its write into the bank


@dataclass
class Eviction:
    """Rows that left the ring at `step`: device copies for lookups, host copies (maybe in flight) for the write."""

    step: int
    rows: torch.Tensor  # int64 [E] (compute device)
    w: torch.Tensor  # [E,D] the storage dtype (rounded as the bank will hold them; compute device)
    u: torch.Tensor  # [E,D]
    staged: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # rows, w, u on the bank's device (None: not
    # the writer, the rows are kept for lookups only)
    event: torch.cuda.Event | None  # the staging copy's completion (CUDA → host only)


def stage(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`; CUDA → CPU goes through pinned memory without blocking the host (wait on an event later)."""
    if t.device == device:
        return t
    if t.device.type == "cuda" and device.type == "cpu":
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return out.copy_(t, non_blocking=True)
    return t.to(device)


def to_compute(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host rows to the compute device: pinned, then a non-blocking copy (the caching host allocator keeps the
    pinned block alive until the copy is done)."""
    if t.device == device:
        return t
    if t.device.type == "cpu":
        return (t.pin_memory() if device.type == "cuda" else t).to(device, non_blocking=True)
    return t.to(device)


class EvictionQueue:
    """The rows that left the ring in the last `lag` steps and are not yet in the bank."""

    def __init__(self, lag: int = WRITEBACK_LAG):
        if lag < 0:
            raise ValueError(f"write-back lag must be >= 0, got {lag}")
        self.lag = lag
        self._queue: deque[Eviction] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def put(self, step: int, rows: torch.Tensor, w: torch.Tensor, u: torch.Tensor,
            bank_device: torch.device | None) -> None:
        """bank_device: where the write will happen; None: this rank does not write (lookups only)."""
        if bank_device is None:
            self._queue.append(Eviction(step, rows, w, u, None, None))
            return
        staged = (stage(rows, bank_device), stage(w, bank_device), stage(u, bank_device))
        event = None
        if w.device.type == "cuda" and bank_device.type != "cuda":
            event = torch.cuda.Event()
            event.record()
        self._queue.append(Eviction(step, rows, w, u, staged, event))

    def due(self, step: int) -> list[Eviction]:
        """Pop the evictions to write at the end of `step` (left at step − lag or before); waits for their copies."""
        out = []
        while self._queue and self._queue[0].step <= step - self.lag:
            out.append(self._pop())
        return out

    def drain(self) -> list[Eviction]:
        """Pop them all (a checkpoint, the end of a run)."""
        return [self._pop() for _ in range(len(self._queue))]

    def _pop(self) -> Eviction:
        ev = self._queue.popleft()
        if ev.event is not None:
            ev.event.synchronize()  # recorded `lag` steps ago: done unless the host ran that far ahead of the GPU
        return ev

    def lookup(self, ids: torch.Tensor, w: torch.Tensor, u: torch.Tensor,
               last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows w, u [B,D] and last [B] as gathered from the bank for `ids` [B] (all on the compute device), with
        the queued rows' values put in for ids that left the ring recently (the newest eviction wins). No host sync:
        a [B, E] comparison."""
        for ev in self._queue:  # oldest first, so a newer eviction of the same row overrides an older one
            match = ids[:, None] == ev.rows[None, :]  # bool [B, E]: 16 MB at B = E = 4,096
            hit = match.any(1)
            at = match.to(torch.uint8).argmax(1)  # any match: duplicates in one eviction carry equal rows
            keep = hit[:, None]
            w = torch.where(keep, ev.w.index_select(0, at).to(w.dtype), w)
            u = torch.where(keep, ev.u.index_select(0, at).to(u.dtype), u)
            last = torch.where(hit, torch.full_like(last, ev.step), last)
        return w, u, last
