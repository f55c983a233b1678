"""The instance bank: PIC's N-way cosine classifier, with its own row-sparse momentum SGD.

State (saved in checkpoints; an mmap bank is referred to, not copied: model/bank_storage.py):
    weight   [N,D]  classifier rows w_j (raw; the logits use w_j/‖w_j‖), init N(0, init_std²); fp32, bf16 or fp16
    momentum [N,D]  SGD momentum buffers u_j (same dtype)
    last     [N]    int64, index of the SGD step that last updated row j (−1 = never)
Storage (`storage`): this process's tensors ("device", the default), or one copy per node in shared memory ("host")
or in a memory-mapped disk file ("mmap"); see model/bank_storage.py for the write rule and exact resume. With bf16 /
fp16 rows everything below runs in fp32 on the gathered rows, which are rounded (to nearest) when written back.
With recent negatives the rows of the FIFO can be kept on the compute device (`cache`, pic.bank_cache: on by default
for host / mmap banks): the same numbers, but a step reads and writes only B rows of the bank (model/recent_rows.py).

Per training step t (spec §4–§5):
    1. candidates C_t: all rows (full soft-max) or the current batch ∪ the recent-negative FIFO;
    2. gather rows C_t and bring them up to date: steps last[j]+1 … t−1 ran with zero gradient for them, which the
       closed-form correction applies (model/correction.py) — with the full soft-max every row is updated every
       step, so nothing is stale and no correction runs;
    3. logits s = ẑ·ŵ_Cᵀ/τ (fp32), targets = positions of the batch ids in C_t;
    4. after backward, `step(lr, t)`: u ← m·u + (g + λw); w ← w − η·u on rows C_t only; last[C_t] ← t.

The bank is kept outside the backbone's optimizer because that optimizer would update (and decay) all N rows every
step; here the untouched rows cost nothing and are corrected lazily, exactly.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model import distributed as dist
from model.bank_storage import BankFileError, FileStorage, dtype_of
from model.correction import CorrectionTable, correct_rows
from model.negatives import RecentNegatives, uses_full_softmax
from model.recent_rows import WRITEBACK_LAG, EvictionQueue, to_compute

NORM_EPS = 1e-6  # spec §12: the released code's 1e-12 is one suspect for late NaNs


@dataclass
class PendingUpdate:
    """What a forward leaves for `InstanceBank.step`: the candidate rows and the leaf their logits came from."""

    rows: torch.Tensor | None  # [C] row ids of the candidate slots; None: all N rows (full soft-max)
    weight: torch.Tensor  # [C,D] the (corrected) rows as a leaf on the logits' device; .grad is the row gradient
    momentum: torch.Tensor  # [C,D] their (corrected) momentum, or the whole [N,D] buffer
    src: torch.Tensor | None  # [C] the slot whose update each (duplicate) slot takes
    ids: torch.Tensor  # [B·world] the global batch's ids (pushed into the recent-negative FIFO)
    slot_of: torch.Tensor | None = None  # [K+B] sorted position of each [ring, batch] slot (with the ring's cache)


class InstanceBank(nn.Module):
    def __init__(self, num_instances: int, dim: int = 128, temperature: float = 0.2, init_std: float = 0.01,
                 momentum: float = 0.9, weight_decay: float = 1e-4, negatives: str = "full", k: int = 65536,
                 batch_size: int = 256, correction: str = "exact", lr_history: np.ndarray | None = None,
                 generator: torch.Generator | None = None, storage: str = "device", dtype: str = "fp32",
                 bank_file: str = "", cache: bool = False, writeback_lag: int = WRITEBACK_LAG):
        super().__init__()
        self.num_instances = num_instances
        self.dim = dim
        self.temperature = temperature
        self.m = momentum
        self.wd = weight_decay
        self.correction = correction
        store = dtype_of(dtype)
        self.file: FileStorage | None = None
        if storage == "device":
            self.register_buffer("weight", (torch.randn(num_instances, dim, generator=generator) * init_std).to(store))
            self.register_buffer("momentum", torch.zeros(num_instances, dim, dtype=store))
            self.register_buffer("last", torch.full((num_instances,), -1, dtype=torch.int64))
        elif storage in ("host", "mmap"):
            if not bank_file:
                raise ValueError(f"bank storage {storage!r} needs a folder (pic.bank_file)")
            # plain attributes, not buffers: model.to(device) must not copy the shared mapping
            self.file = FileStorage(storage, bank_file, num_instances, dim, store, init_std, generator)
            self.weight, self.momentum, self.last = self.file.weight, self.file.momentum, self.file.last
        else:
            raise ValueError(f"bank storage must be device, host or mmap, got {storage!r}")
        self._storage_ref: dict | None = None
        self.sampled = negatives == "recent" and not uses_full_softmax(k, num_instances)
        self.negatives = RecentNegatives(k, batch_size) if self.sampled else None
        # the ring's rows on the compute device (model/recent_rows.py): a step then reads and writes B bank rows
        self.cached = self.sampled and cache
        # [K+B,D] work dtype: rows [0,K) slot for slot with the ring (valid [:filled]), rows [K,K+B) the batch's
        # rows read from the bank this step (one buffer, so the K+B candidate slots are one index_select)
        self._ring_w: torch.Tensor | None = None
        self._ring_u: torch.Tensor | None = None
        self._evictions = EvictionQueue(writeback_lag)
        self._flushed = True  # the bank holds every row's newest value (no step since the last flush)
        self.lr_history = None if lr_history is None else np.asarray(lr_history, np.float64)
        self._table: CorrectionTable | None = None
        # the correction's form: the incremental device table (sync-free; the default for a CUDA bank) or the
        # one-off numba/torch kernels (default elsewhere); tests set True to run the table on the CPU
        self.use_table: bool | None = None
        self._pending: PendingUpdate | None = None

    @property
    def pending(self) -> PendingUpdate | None:
        """The update the last forward prepared (None after `step` / `skip_step`)."""
        return self._pending

    # ---- step part 1: candidates, correction, logits -------------------------------------------------------

    def _correct(self, w: torch.Tensor, u: torch.Tensor, last: torch.Tensor, now: int):
        """Rows w, u [R,D] last updated at `last` [R] → their state just before step `now`."""
        if self.correction == "none" or self.lr_history is None:
            return w, u
        if self.use_table if self.use_table is not None else w.device.type == "cuda":
            if self._table is None:
                self._table = CorrectionTable(self.lr_history, self.m, self.wd, self.correction, w.device)
                self._table.seek(now)
            while self._table.now < now:  # one left-multiplication per step, no host sync
                self._table.advance()
            if self._table.now != now:
                self._table.seek(now)
            return self._table.apply(w, u, last)
        return correct_rows(w, u, last, now, self.lr_history, self.m, self.wd, mode=self.correction)

    @property
    def work_dtype(self) -> torch.dtype:
        """The dtype of the row math: fp32 for bf16/fp16 storage, else the storage dtype (fp64 in the tests)."""
        return torch.float32 if self.weight.dtype in (torch.bfloat16, torch.float16) else self.weight.dtype

    def gather(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows w, u [R,D] (as stored, widened to `work_dtype`; not yet corrected) of the row ids `rows` [R] (on the
        bank's device). Reads only: may be issued apart from the forward (e.g. on a side stream)."""
        w = self.weight.index_select(0, rows).to(self.work_dtype)
        u = self.momentum.index_select(0, rows).to(self.work_dtype)
        return w, u

    def scatter(self, rows: torch.Tensor, w: torch.Tensor, u: torch.Tensor, last: torch.Tensor) -> None:
        """Write rows (duplicates must carry equal values): rounded to the storage dtype. A shared bank: the node's
        writer writes, then every local rank waits at the node barrier; call it on every rank."""
        self._write(rows, w, u, last)
        if self.file is not None:
            self.file.barrier()

    def _write(self, rows: torch.Tensor, w: torch.Tensor, u: torch.Tensor, last: torch.Tensor) -> None:
        """`scatter` without the barrier (rows, w, u, last on the bank's device or the host)."""
        if self.file is None:
            dev = self.weight.device
            self.weight.index_copy_(0, rows.to(dev), w.to(dev, self.weight.dtype))
            self.momentum.index_copy_(0, rows.to(dev), u.to(dev, self.momentum.dtype))
            self.last.index_copy_(0, rows.to(dev), last.to(dev))
        elif self.file.writer:
            self.file.write_rows(rows, w, u, last)

    # ---- the ring's rows on the compute device (model/recent_rows.py) -----------------------------------------

    def _fresh_rows(self, ids: torch.Tensor, now: int, dev: torch.device,
                    ids_bank: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows `ids` [R] (on `dev`; `ids_bank`: the same on the bank's device, if at hand) read from the bank, or
        from the evictions not yet written, and brought up to date for step `now`: w, u [R,D] in the work dtype on
        `dev`."""
        ids_bank = ids.to(self.weight.device) if ids_bank is None else ids_bank
        w, u = self.gather(ids_bank)
        last = self.last.index_select(0, ids_bank)
        w, u, last = to_compute(w, dev), to_compute(u, dev), to_compute(last, dev)
        w, u, last = self._evictions.lookup(ids, w, u, last)
        return self._correct(w, u, last, now)

    def _slot_rows(self, ids: torch.Tensor, order: torch.Tensor, now: int, dev: torch.device,
                   ids_bank: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """w, u [K+B,D] of the sorted candidate slots: filled ring slots from the cache, the batch (and the padding
        of an unfilled ring, a copy of the batch's first id) from the bank."""
        k, filled, b = self.negatives.k, self.negatives.filled, ids.numel()  # b ≤ batch_size
        fw, fu = self._fresh_rows(ids, now, dev, ids_bank)
        if self._ring_w is None:
            self._ring_w = fw.new_zeros(k + self.negatives.batch_size, self.dim)
            self._ring_u = fu.new_zeros(k + self.negatives.batch_size, self.dim)
            if filled:  # a resume without the cache in the checkpoint: the ring's rows read back once
                ring = self.negatives.ring()[:filled].to(dev)
                self._ring_w[:filled], self._ring_u[:filled] = self._fresh_rows(ring, now, dev)
        elif self._ring_w.device != dev:  # loaded from a checkpoint on the CPU
            self._ring_w, self._ring_u = self._ring_w.to(dev), self._ring_u.to(dev)
        self._ring_w[k:k + b], self._ring_u[k:k + b] = fw, fu
        # unsorted slot -> buffer row: a filled ring slot its own row, padding the batch's first id's row, batch j
        # row K+j
        src = torch.where(order < filled, order, torch.where(order < k, torch.full_like(order, k), order))
        return self._ring_w.index_select(0, src), self._ring_u.index_select(0, src)

    def _roll(self, pending: PendingUpdate, w: torch.Tensor, u: torch.Tensor, step: int) -> None:
        """After the update of step `step` (w, u [K+B,D]: the sorted slots; a duplicate slot's row is its valid
        slot's, `src`): the new ring's rows become the cache, the rows leaving the ring are queued for the bank,
        and queued rows that are due are written."""
        neg, k, dev = self.negatives, self.negatives.k, w.device
        b, filled = pending.ids.numel(), neg.filled
        n = min(b, k)  # the push below writes the last n batch ids to ring slots pos (built on the device from
        pos = (torch.arange(n, device=dev) + neg.ptr) % k  # host ints: no copy from the host, no sync)
        slot_of = pending.slot_of
        take = slot_of[:k].clone()  # new ring slot -> sorted slot holding its id
        take[pos] = slot_of[k + b - n:]
        leaving = [slot_of.index_select(0, pos[k - filled:]),  # overwritten slots that held an id (see neg.ptr)
                   slot_of[k:k + b - n]]  # B > K: the batch's ids that never enter the ring
        leaving = pending.src.index_select(0, torch.cat(leaving))  # the valid slots: their rows were updated
        take = pending.src.index_select(0, take)
        torch.index_select(w, 0, take, out=self._ring_w[:k])
        torch.index_select(u, 0, take, out=self._ring_u[:k])
        neg.push(pending.ids)
        if leaving.numel():
            # rounded now as the bank will store them: a read from the queue or from the bank gives the same
            # numbers, so neither the lag nor a checkpoint's flush can change the trajectory of bf16 / fp16 rows
            store = self.weight.dtype
            ew, eu = w.index_select(0, leaving).to(store), u.index_select(0, leaving).to(store)
            writes = self.file is None or self.file.writer  # other ranks keep them for lookups only
            self._evictions.put(step, pending.rows.index_select(0, leaving), ew, eu,
                                self.weight.device if writes else None)
        for ev in self._evictions.due(step):
            self._write_eviction(ev)
        self._flushed = False
        if self.file is not None:
            self.file.barrier()

    def _write_eviction(self, ev) -> None:
        if ev.staged is not None:  # (None: not the writer)
            rows, ew, eu = ev.staged
            self._write(rows, ew, eu, torch.full_like(rows, ev.step))

    @torch.no_grad()
    def flush(self, last_step: int, barrier: bool = True) -> None:
        """Every rank: write the queued evictions and the ring's cached rows (updated at `last_step`) into the bank,
        so that it holds every row's newest value (before a checkpoint, at the end of a run). The cache stays.
        barrier=False: rank 0 alone at the end of a run (the others have left)."""
        if not self.cached:
            return
        for ev in self._evictions.drain():
            self._write_eviction(ev)
        filled = self.negatives.filled
        self._flushed = True
        if self._ring_w is not None and filled and (self.file is None or self.file.writer):
            bank = self.weight.device
            rows = self.negatives.ring()[:filled].to(bank)
            self._write(rows, self._ring_w[:filled].to(bank), self._ring_u[:filled].to(bank),
                        torch.full_like(rows, last_step))
        if self.file is not None and barrier:
            self.file.barrier()

    def forward(self, z: torch.Tensor, ids: torch.Tensor, step: int, z_small: tuple[torch.Tensor, ...] = (),
                ids_host: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """z: [B,D] features of the large crop (normalised or not), ids: [B] instance ids, z_small: [B,D] per small
        crop, ids_host: the same ids in host memory if the loader has them (a host bank under a GPU reads its rows
        without copying the ids back from the GPU). Returns logits [(1+len(z_small))·B, |C|] (crop-major) and
        targets (same length)."""
        dev = z.device
        # Under DDP every rank builds the same candidate set from the global batch (ids gathered rank-major) and
        # keeps the targets of its own rows; the row gradients are averaged in step(), so all replicas stay equal.
        gathered = dist.all_gather_cat(ids)
        global_ids = gathered if self.cached else gathered.to(self.weight.device)
        mask = None
        if self.sampled:
            # K+B fixed slots (duplicates masked) instead of unique(): static shapes, no host sync per step
            b = ids.shape[0]
            if self.cached:  # the ring's rows from the cache, the batch's from the bank: same values, B reads
                global_ids = global_ids.to(dev)  # the batch's bank rows are read in _fresh_rows
                s = self.negatives.slots(global_ids)
                rows, valid, src = s.rows, s.valid, s.src
                targets = s.targets[dist.rank() * b:(dist.rank() + 1) * b]
                host_ids = None
                if ids_host is not None and self.weight.device.type == "cpu" and dev.type != "cpu":
                    host_ids = dist.all_gather_cat_host(ids_host.to(torch.int64))  # gloo: no GPU sync
                w, u = self._slot_rows(global_ids, s.order, step, dev, host_ids)
                w_leaf = w.requires_grad_()
                self._pending = PendingUpdate(rows, w_leaf, u, src, global_ids, s.slot_of)
            else:
                rows, valid, src, global_targets = self.negatives.candidate_slots(global_ids)
                targets = global_targets[dist.rank() * b:(dist.rank() + 1) * b]
                w, u = self.gather(rows)
                w, u = self._correct(w, u, self.last.index_select(0, rows), step)
                w_leaf = w.to(dev, non_blocking=True).requires_grad_()
                self._pending = PendingUpdate(rows, w_leaf, u, src, global_ids)
            mask = ~valid.to(dev)
        elif self.file is None and self.weight.dtype == self.work_dtype:
            targets = ids.to(self.weight.device)
            w_leaf = self.weight.detach().to(dev).requires_grad_()
            self._pending = PendingUpdate(None, w_leaf, self.momentum, None, global_ids)
        else:  # a shared or low-precision bank: the update runs on fp32 copies, written back in step()
            targets = ids.to(self.weight.device)
            w_leaf = self.weight.detach().to(dev, self.work_dtype, copy=True).requires_grad_()
            u = self.momentum.to(self.work_dtype, copy=True)
            self._pending = PendingUpdate(None, w_leaf, u, None, global_ids)
        work = torch.promote_types(w_leaf.dtype, torch.float32)  # fp32 logits (fp64 for a .double() bank: tests)
        # Autocast off: under bf16 autocast the matmul below would run in bf16 (logit error ~0.025 at τ = 0.2,
        # row gradients in bf16); a soft-max over 65k+ columns at τ = 0.2 wants fp32 (spec §1).
        with torch.autocast(dev.type, enabled=False) if dev.type != "meta" else nullcontext():  # (meta: the tests)
            w_hat = F.normalize(w_leaf.to(work), dim=1, eps=NORM_EPS)  # [C,D]
            logits = [F.normalize(z.to(work), dim=1, eps=NORM_EPS) @ w_hat.t()]
            # Small crops train only the encoder: W gets gradient from the large crop alone (spec §2).
            w_hat_const = w_hat.detach()
            logits += [F.normalize(zs.to(work), dim=1, eps=NORM_EPS) @ w_hat_const.t() for zs in z_small]
            logits = torch.cat(logits) / self.temperature
        if mask is not None:  # duplicate slots: no probability mass, no gradient
            logits = logits.masked_fill(mask, float("-inf"))
        targets = targets.to(dev)
        return logits, targets.repeat(1 + len(z_small))

    # ---- step part 2: the row-sparse SGD update --------------------------------------------------------------

    @torch.no_grad()
    def unscale_grad_(self, inv_scale: float) -> torch.Tensor:
        """fp16 with a GradScaler: the row gradient carries the loss scale like every other gradient, but the
        scaler only unscales its optimizer's parameters. Unscale it here; returns whether it is finite (a 0-d bool
        tensor on its device: no sync)."""
        if self._pending is None or self._pending.weight.grad is None:
            return torch.ones((), dtype=torch.bool)
        g = self._pending.weight.grad
        g.mul_(inv_scale)
        return torch.isfinite(g).all()

    @torch.no_grad()
    def step(self, lr: float, step: int, finite: torch.Tensor | None = None) -> None:
        """Momentum SGD (PyTorch semantics, dampening 0) on the rows used by the last forward.

        finite: optional 0-d bool tensor (device-side "the loss was finite"); when false the update is a no-op,
        decided on the device without a host sync (the CUDA loop). None: the caller already checked on the host.
        """
        if self._pending is None:
            raise RuntimeError("InstanceBank.step() called without a forward")
        pending, self._pending = self._pending, None
        rows, w_leaf, u, src = pending.rows, pending.weight, pending.momentum, pending.src
        g = w_leaf.grad
        if g is None:
            g = torch.zeros_like(w_leaf)
        dist.all_reduce_mean_(g)  # |C|xD (sampled) or NxD (full soft-max) rows, same on every rank afterwards
        if pending.slot_of is not None:  # the ring's cache: everything stays on the compute device
            w = w_leaf.detach()
            g = g.to(w.dtype)
            old = None
            if finite is not None:  # a skipped step: the zero-gradient update (what the correction would apply)
                ok = finite.to(w.device)
                g = torch.where(ok, g, torch.zeros((), dtype=g.dtype, device=g.device))
                if self.correction == "none" or self.lr_history is None:  # ... unless there is none: unchanged
                    old = (ok, w.clone(), u.clone())
            u.mul_(self.m).add_(g).add_(w, alpha=self.wd)  # the same ops as below: the same bits as uncached
            w.sub_(u, alpha=lr)
            if old is not None:
                ok, w_old, u_old = old
                w, u = torch.where(ok, w, w_old), torch.where(ok, u, u_old)
            self._roll(pending, w, u, step)
            return
        w = w_leaf.detach().to(self.weight.device)
        g = g.to(self.weight.device, dtype=w.dtype)
        ok = None if finite is None else finite.to(w.device)  # the bank's device: weight, momentum, last
        if ok is None or rows is not None:  # sampled rows: a skipped step's rows are replaced by the stored ones below
            if ok is not None:  # (g zeroed first: NaN * 0 would be NaN)
                g = torch.where(ok, g, torch.zeros((), dtype=g.dtype, device=g.device))
            u.mul_(self.m).add_(g).add_(w, alpha=self.wd)
            w.sub_(u, alpha=lr)
        else:  # the full table, in place: f = 1: the update above; f = 0: u and w unchanged (g zeroed first)
            f = ok.to(w.dtype)
            g = torch.where(ok, g, torch.zeros((), dtype=g.dtype, device=g.device))
            u.mul_(1 + f * (self.m - 1)).add_(g).add_(w * (f * self.wd))
            w.sub_(u * (f * lr))
        new_last = torch.full((), step, dtype=torch.int64, device=self.last.device)
        writes = self.file is None or self.file.writer
        if rows is None:
            if writes:
                if w.data_ptr() != self.weight.data_ptr():  # bank on another device / dtype than the logits
                    self.weight.copy_(w)
                if u.data_ptr() != self.momentum.data_ptr():
                    self.momentum.copy_(u)
                if ok is None:
                    self.last.fill_(step)
                else:
                    self.last.copy_(torch.where(ok, new_last, self.last))
            if self.file is not None:
                self.file.barrier()
        else:
            # every duplicate slot takes the update of its id's valid slot, so the scatter writes one value per row
            if writes:
                w, u = w.index_select(0, src), u.index_select(0, src)
                if ok is not None:  # a skipped step leaves the stored (uncorrected) rows and `last` as they were
                    w = torch.where(ok, w, self.weight.index_select(0, rows).to(w.dtype))
                    u = torch.where(ok, u, self.momentum.index_select(0, rows).to(u.dtype))
                    new_last = torch.where(ok, new_last, self.last.index_select(0, rows))
            self.scatter(rows, w, u, new_last.expand(rows.shape[0]).contiguous())
            self.negatives.push(pending.ids)

    def skip_step(self, lr: float | None = None, step: int | None = None) -> None:
        """Drop the pending update (non-finite loss): no row changes. The batch's ids still enter the recent-negative
        FIFO, as in the sync-free path (which cannot make that host-side push conditional without a sync). The step
        index still advances, so rows corrected lazily later treat the skipped step as a zero-gradient step (weight
        decay and momentum applied), while the backbone did not step: a negligible difference, only on skips.
        With the ring's cache that zero-gradient update is applied now (lr, step: the skipped step's)."""
        if self._pending is not None and self._pending.slot_of is not None:
            if lr is None or step is None:
                raise ValueError("skip_step with the ring's cache needs the step's lr and index")
            self._pending.weight.grad = None
            self.step(lr, step, finite=torch.zeros((), dtype=torch.bool, device=self._pending.weight.device))
            return
        if self._pending is not None and self._pending.rows is not None:
            self.negatives.push(self._pending.ids)
        self._pending = None

    @torch.no_grad()
    def bring_up_to_date(self, now: int) -> None:
        """Correct every row to the state just before step `now` (end of training / export)."""
        self.flush(now - 1, barrier=False)
        if not self.sampled or self.correction == "none" or self.lr_history is None:
            return
        if self.file is not None or self.weight.dtype != self.work_dtype:
            self._bring_up_to_date_chunked(now)
            return
        stale = (self.last < now - 1).nonzero().flatten()
        if stale.numel() == 0:
            return
        w, u = correct_rows(self.weight[stale], self.momentum[stale], self.last[stale], now, self.lr_history,
                            self.m, self.wd, mode=self.correction)
        self.weight[stale] = w
        self.momentum[stale] = u
        self.last[stale] = now - 1

    def _bring_up_to_date_chunked(self, now: int, chunk: int = 1 << 20) -> None:
        """The same for a shared or low-precision bank: fp32 copies of at most `chunk` rows at a time; the node's
        writer writes. Called by rank 0 alone at the end of a run (no barrier: the other ranks have left); the
        end-of-run state is not journaled: the file then holds the corrected rows."""
        if self.file is None or self.file.writer:
            for a in range(0, self.num_instances, chunk):
                idx = a + (self.last[a:a + chunk] < now - 1).nonzero().flatten()
                if idx.numel() == 0:
                    continue
                w, u = correct_rows(self.weight[idx].to(self.work_dtype), self.momentum[idx].to(self.work_dtype),
                                    self.last[idx], now, self.lr_history, self.m, self.wd, mode=self.correction)
                self.weight[idx] = w.to(self.weight.dtype)
                self.momentum[idx] = u.to(self.momentum.dtype)
                self.last[idx] = now - 1

    # ---- checkpoint --------------------------------------------------------------------------------------------

    def checkpoint_storage(self, step: int) -> None:
        """Every rank, before a checkpoint of the state at the start of step `step` is written: an mmap bank
        flushes its file and starts the undo journal of `step` (model/bank_storage.py)."""
        self.flush(step - 1)
        if self.file is not None and self.file.kind == "mmap":
            self._storage_ref = self.file.checkpoint(step)

    def extra_state(self) -> dict:
        """The recent-negative FIFO, for an mmap bank the reference to its file (checkpoint_storage first), and
        the ring's cached rows oldest first (fp32: with bf16 rows the bank holds them rounded; exact resume)."""
        if self.file is not None and self.file.kind == "mmap" and self._storage_ref is None:
            raise RuntimeError("an mmap bank's checkpoint needs checkpoint_storage(step) first")
        ring_rows = None
        if self.cached and not self._flushed:  # the bank would miss the queued and the ring's newest rows
            raise RuntimeError("a checkpoint of a bank with the ring's cache needs checkpoint_storage(step) first")
        if self.cached and self._ring_w is not None:  # rows [0, filled) of the ring, oldest first
            order = torch.from_numpy(self.negatives.oldest_first()).to(self._ring_w.device)
            ring_rows = {"w": self._ring_w.index_select(0, order).cpu(), "u": self._ring_u.index_select(0, order).cpu()}
        return {"negatives": self.negatives.state_dict() if self.negatives is not None else None,
                "storage": self._storage_ref, "ring_rows": ring_rows}

    def load_extra_state(self, state: dict) -> None:
        """Every rank. An mmap bank rolls its file back to the checkpoint's step (a BankFileError on a mismatch)."""
        if self.negatives is not None and state.get("negatives") is not None:
            self.negatives.load_state_dict(state["negatives"])
        self._ring_w = self._ring_u = None  # read back from the bank at the next step, unless saved here
        self._evictions.drain()  # (empty after a checkpoint's flush; a resume into a used bank drops its queue)
        saved = state.get("ring_rows")
        if self.cached and saved is not None and saved["w"].shape[0] == self.negatives.filled:
            # the loaded ring is slots 0..filled-1, oldest first; the buffer's batch rows follow
            k, filled, b = self.negatives.k, self.negatives.filled, self.negatives.batch_size
            self._ring_w = torch.cat([saved["w"], saved["w"].new_zeros(k + b - filled, self.dim)])
            self._ring_u = torch.cat([saved["u"], saved["u"].new_zeros(k + b - filled, self.dim)])
        if self.file is not None and self.file.kind == "mmap":
            ref = state.get("storage")
            if ref is None:
                raise BankFileError("the checkpoint holds no bank file reference (saved with another "
                                    "pic.bank_storage?)")
            self.file.restore(ref)
            self._storage_ref = dict(ref)

    # host bank: its rows are checkpointed like the device bank's buffers (same state-dict keys)
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.file is not None and self.file.kind == "host":
            for name in ("weight", "momentum", "last"):
                destination[prefix + name] = getattr(self, name)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if self.file is None or self.file.kind != "host":
            return
        keys = [prefix + name for name in ("weight", "momentum", "last")]
        for key in keys:
            if key in unexpected_keys:
                unexpected_keys.remove(key)
            if key not in state_dict:
                missing_keys.append(key)
        if all(k in state_dict for k in keys) and self.file.writer:
            for name, key in zip(("weight", "momentum", "last"), keys, strict=True):
                target = getattr(self, name)
                if state_dict[key].shape != target.shape or state_dict[key].dtype != target.dtype:
                    error_msgs.append(f"{key}: checkpoint {tuple(state_dict[key].shape)} {state_dict[key].dtype}, "
                                      f"bank {tuple(target.shape)} {target.dtype}")
                    continue
                target.copy_(state_dict[key])
        self.file.barrier()
