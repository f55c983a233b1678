"""The recent-negative ring's rows kept on the compute device: a layer over any `Rows` (model/bank/rows.py), so that
a sampled step reads and writes B bank rows, not K + B (pic.bank_cache).

Why it is exact. With recent-negative sampling the candidates of step t are C_t = batch_t ∪ ring_t, where the ring
holds the ids of the previous ceil(K/B) batches. ring_{t+1} = ring_t − (its oldest batch) + batch_t ⊂ C_t, so every
row in the ring took part in the previous step: it is up to date, needs no correction, and its newest value is the
one that step just computed. So this cache keeps W and momentum of the ring's rows on the compute device, slot for
slot with the ring ([K, D] each, in the row math's dtype, fp32), and the bank itself is only touched by
  * the B rows of the batch that are not in the ring (gathered, brought up to date by the closed-form correction)
  * the rows that leave the ring (written back with last = the step that updated them).
Per step that is B rows in and ≤ B rows out (PCIe for a host bank, page cache / disk for an mmap one) instead of
K + B each way, and the correction runs on B rows instead of K + B. The logits, targets and updates are the same
numbers as without the cache (tests/test_ring_cache.py compares them bit for bit), with two stated differences:
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
The event is recorded on the stream of the rows' own device (where the copy was queued), not the current device's.
Ranks that do not write (a shared bank's non-writers) keep the rows for lookups only: what keeps a shared bank's
readers off rows still being written (model/bank/files.py). A checkpoint writes the queue and the whole cache back
into the bank first, and saves the cache itself (exact resume with bf16 rows).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from model.bank.correction import Correction
from model.bank.negatives import RecentNegatives, Slots
from model.bank.rows import Rows

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
            event.record(torch.cuda.current_stream(w.device))  # the stream the staging copies were queued on
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


class RingCache(Rows):
    """The ring's rows over `inner` rows. The classifier owns the recent-negative FIFO (`negatives`, shared here):
    it pushes a batch's ids after `commit`, which reads the ring's positions before the push."""

    skips_change_rows = True  # the ring's rows live here: a skipped step's zero-gradient update is applied now

    def __init__(self, inner: Rows, negatives: RecentNegatives, device: torch.device | str, correction: Correction,
                 lag: int = WRITEBACK_LAG):
        self.inner, self.negatives, self.device = inner, negatives, torch.device(device)
        self.n, self.dim, self.dtype, self.writer = inner.n, inner.dim, inner.dtype, inner.writer
        self.correction = correction  # runs on the compute device (the table on CUDA)
        # [K+B,D] work dtype: rows [0,K) slot for slot with the ring (valid [:filled]), rows [K,K+B) the batch's
        # rows read from the bank this step (one buffer, so the K+B candidate slots are one index_select)
        self._w: torch.Tensor | None = None
        self._u: torch.Tensor | None = None
        self._step = -1  # the step that last updated the ring's rows
        self.queue = EvictionQueue(lag)

    @property
    def last(self) -> torch.Tensor:
        return self.inner.last

    @property
    def reads_in_host_memory(self) -> bool:  # the cache lives on the compute device; what it reads is the bank's
        return self.inner.reads_in_host_memory

    def table(self):
        return self.inner.table()

    # ---- any rows: the bank's, the queued evictions' over them, the ring's over both -----------------------

    def _bank_rows(self, ids: torch.Tensor, ids_host: torch.Tensor | None = None):
        """Rows `ids` (on the compute device; ids_host: the same in host memory) from the bank, or from the queued
        evictions not yet written: w, u, last on the compute device."""
        w, u, last = self.inner.read(ids_host if ids_host is not None else ids)
        w, u, last = (to_compute(x, self.device) for x in (w, u, last))
        return self.queue.lookup(ids, w, u, last)

    def read(self, ids):
        ids = torch.arange(self.n, device=self.device) if ids is None else ids.to(self.device)
        w, u, last = self._bank_rows(ids)
        filled = self.negatives.filled
        if self._w is not None and filled:  # ids in the ring: its rows (updated at the last step)
            ring, order = torch.sort(self.negatives.ring()[:filled].to(self.device))
            pos = torch.searchsorted(ring, ids).clamp(max=filled - 1)
            hit = ring[pos] == ids
            slot = order[pos]
            w = torch.where(hit[:, None], self._w.index_select(0, slot), w)
            u = torch.where(hit[:, None], self._u.index_select(0, slot), u)
            last = torch.where(hit, torch.full_like(last, self._step), last)
        return w, u, last

    def write(self, ids, w, u, last):
        """Outside the training step (the step writes through `commit`): the cache is written back and dropped
        first, so the rows are read back from the bank when next needed."""
        self.write_back()
        self._w = self._u = None
        self.inner.write(ids, w, u, last)

    # ---- the candidate slots of a sampled step ----------------------------------------------------------------

    def candidates(self, slots: Slots, batch_ids, now, device, ids_host=None):
        """w, u [K+B,D] of the sorted candidate slots: filled ring slots from the cache, the batch (and the padding
        of an unfilled ring, a copy of the batch's first id) from the bank, corrected here."""
        neg = self.negatives
        k, filled, b = neg.k, neg.filled, batch_ids.numel()  # b ≤ batch_size
        fw, fu = self.correction(*self._bank_rows(batch_ids, ids_host), now)
        if self._w is None:
            self._w = fw.new_zeros(k + neg.batch_size, self.dim)
            self._u = fu.new_zeros(k + neg.batch_size, self.dim)
            if filled:  # a resume without the cache in the checkpoint: the ring's rows read back once
                ring = neg.ring()[:filled].to(self.device)
                self._w[:filled], self._u[:filled] = self.correction(*self._bank_rows(ring), now)
        self._w[k:k + b], self._u[k:k + b] = fw, fu
        # unsorted slot -> buffer row: a filled ring slot its own row, padding the batch's first id's row, batch j
        # row K+j
        order = slots.order
        src = torch.where(order < filled, order, torch.where(order < k, torch.full_like(order, k), order))
        return self._w.index_select(0, src), self._u.index_select(0, src)

    def commit(self, slots, batch_ids, before, after, step, ok):
        """After the update of step `step` (the sorted slots; a duplicate slot's row is its valid slot's, `src`): the
        new ring's rows become the cache, the rows leaving the ring are queued for the bank, and queued rows that
        are due are written. A skipped step (ok false) keeps the zero-gradient update that the correction would
        apply later, or, without a correction (pic.correction=none), the rows as they were."""
        w, u = after
        if ok is not None and not self.correction.active:
            w, u = torch.where(ok, w, before[0]), torch.where(ok, u, before[1])
        neg, k = self.negatives, self.negatives.k
        b, filled, slot_of, src = batch_ids.numel(), neg.filled, slots.slot_of, slots.src
        n = min(b, k)  # the push that follows writes the last n batch ids to ring slots pos (built on the device
        pos = (torch.arange(n, device=w.device) + neg.ptr) % k  # from host ints: no copy from the host, no sync)
        take = slot_of[:k].clone()  # new ring slot -> sorted slot holding its id
        take[pos] = slot_of[k + b - n:]
        leaving = [slot_of.index_select(0, pos[k - filled:]),  # overwritten slots that held an id (see neg.ptr)
                   slot_of[k:k + b - n]]  # B > K: the batch's ids that never enter the ring
        leaving = src.index_select(0, torch.cat(leaving))  # the valid slots: their rows were updated
        take = src.index_select(0, take)
        torch.index_select(w, 0, take, out=self._w[:k])
        torch.index_select(u, 0, take, out=self._u[:k])
        if leaving.numel():
            # rounded now as the bank will store them: a read from the queue or from the bank gives the same
            # numbers, so neither the lag nor a checkpoint's write-back can change the trajectory of bf16 / fp16 rows
            ew, eu = w.index_select(0, leaving).to(self.dtype), u.index_select(0, leaving).to(self.dtype)
            self.queue.put(step, slots.rows.index_select(0, leaving), ew, eu,
                           self.inner.device if self.writer else None)  # other ranks keep them for lookups only
        for ev in self.queue.due(step):
            self._write(ev)
        self._step = step
        self.inner.sync_ranks()

    def _write(self, ev: Eviction) -> None:
        if ev.staged is not None:  # (None: not the writer)
            rows, ew, eu = ev.staged
            self.inner.write(rows, ew, eu, torch.full_like(rows, ev.step))

    # ---- life ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def write_back(self) -> None:
        """Write the queued evictions and the ring's rows into the bank, so that it holds every row's newest value
        (the cache stays). No barrier (the end of a run: the checkpoint that follows has one)."""
        for ev in self.queue.drain():
            self._write(ev)
        filled = self.negatives.filled
        if self._w is not None and filled and self.writer:
            rows = self.negatives.ring()[:filled].to(self.inner.device)
            self.inner.write(rows, self._w[:filled].to(self.inner.device), self._u[:filled].to(self.inner.device),
                             torch.full_like(rows, self._step))

    def flush(self) -> None:
        self.write_back()
        self.inner.flush()

    def checkpoint(self, step: int) -> dict:
        """Every rank: the bank gets the cache's rows, then its checkpoint; the cache is saved too, oldest first, in
        the work dtype (with bf16 rows the bank holds them rounded: exact resume needs these)."""
        self.write_back()
        self.inner.sync_ranks()
        state = self.inner.checkpoint(step)
        ring = None
        if self._w is not None:
            order = torch.from_numpy(self.negatives.oldest_first()).to(self._w.device)
            ring = {"w": self._w.index_select(0, order).cpu(), "u": self._u.index_select(0, order).cpu(),
                    "step": self._step}
        return {**state, "ring_rows": ring}

    def committed(self, step: int) -> None:
        self.inner.committed(step)

    def restore(self, state: dict) -> None:
        """Every rank, after the FIFO was restored: the bank's state, and the cache when the checkpoint has it (else
        the ring's rows are read back from the bank at the next step)."""
        self.inner.restore(state)
        self.queue.drain()  # (empty after a checkpoint's write-back; a resume into a used bank drops its queue)
        self._w = self._u = None
        saved = state.get("ring_rows")
        neg = self.negatives
        if saved is not None and saved["w"].shape[0] == neg.filled:
            pad = neg.k + neg.batch_size - neg.filled  # the loaded ring is slots 0..filled-1, oldest first
            self._w = torch.cat([saved["w"], saved["w"].new_zeros(pad, self.dim)]).to(self.device)
            self._u = torch.cat([saved["u"], saved["u"].new_zeros(pad, self.dim)]).to(self.device)
            self._step = int(saved["step"])

    def bring_up_to_date(self, now: int) -> None:
        self.write_back()
        self.inner.bring_up_to_date(now)

    def close(self) -> None:
        self.inner.close()
