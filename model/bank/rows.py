"""The bank's rows behind one interface: W [N,D] and momentum [N,D] (fp32, bf16 or fp16; fp64 in the oracle tests)
and last [N] int64, the step that last updated each row (−1: never).

    read(ids)                 stored rows (widened to the work dtype) and their `last`
    gather(ids, now)          the rows brought up to date for step `now` by the injected correction
    write(ids, w, u, last)    rounded to the storage dtype; duplicate ids must carry equal values
    sync_ranks()              a shared bank: the node's ranks wait until its writer has written
    candidates / commit       the K+B candidate slots of a sampled step (the ring cache serves them differently)
    flush()                   the storage holds every row's newest value (a file bank: msync)
    checkpoint(step) -> dict  the state at the start of step `step` (tensors, or a file reference)
    committed(step)           that checkpoint's file is in place (a file bank may drop what only older ones needed)
    restore(state)            back to a checkpoint's state
    bring_up_to_date(now)     every stale row corrected (the end of a run; every rank, each writer its rows)
    close()

Implementations: `TensorRows` (tensors of this process: the training device or host memory), `FileRows`
(model/bank/files.py: one copy per node in shared memory or in a memory-mapped disk folder) and `RingCache`
(model/bank/ring_cache.py: the recent-negative ring's rows kept on the compute device, over any of them).
Low-precision rows are widened to fp32 when read and rounded to nearest when written: the row math is fp32.
"""

from __future__ import annotations

import torch

from model.bank.correction import Correction
from model.bank.negatives import Slots

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
CORRECTION_CHUNK_ROWS = 1 << 20  # rows corrected at a time at the end of a run (fp32 copies of W and u: 1 GB at D 128)


class BankError(ValueError):
    """A bank that cannot be made, opened or restored as asked: one line naming the file or the option."""


def dtype_name(dtype: torch.dtype) -> str:
    return next((k for k, v in DTYPES.items() if v == dtype), str(dtype))


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the row math: fp32 for bf16/fp16 storage, else the storage dtype (fp64 in the oracle tests)."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


class Rows:
    """The interface (see the module docstring), with what every implementation shares."""

    n: int
    dim: int
    dtype: torch.dtype  # as stored
    device: torch.device  # where the rows live (read returns rows there)
    last: torch.Tensor  # int64 [N], the storage's own
    correction: Correction
    writer = True  # this process writes (a shared bank: its node's local rank 0)
    skips_change_rows = False  # a skipped step updates rows now (the ring cache), not later through the correction

    @property
    def work_dtype(self) -> torch.dtype:
        return work_dtype(self.dtype)

    @property
    def reads_in_host_memory(self) -> bool:
        """The stored rows are read from host memory: a step hands them the batch's ids in host memory too, so that
        no id is copied back from the GPU (a blocking copy) to index them."""
        return self.device.type == "cpu"

    def read(self, ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """w, u [R,D] in the work dtype and last [R] of rows `ids` [R] (any device), on `self.device`. ids None: every
        row, which may be the storage itself when it needs no conversion (then update it in place, or not at all)."""
        raise NotImplementedError

    def gather(self, ids: torch.Tensor, now: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows `ids` brought up to date for step `now`: w, u [R,D] in the work dtype (new tensors)."""
        w, u, last = self.read(ids)
        return self.correction(w, u, last, now)

    def write(self, ids: torch.Tensor | None, w: torch.Tensor, u: torch.Tensor, last: torch.Tensor) -> None:
        """Writer only (others return): rows `ids` [R] (None: all) get w, u [R,D] and last [R] (or one 0-d step)."""
        raise NotImplementedError

    def sync_ranks(self) -> None:
        """Every local rank, after the writer's writes of a step: a shared bank's ranks meet at the node's barrier."""

    # ---- the candidate slots of a sampled step ----------------------------------------------------------------

    def candidates(self, slots: Slots, batch_ids: torch.Tensor, now: int, device: torch.device,
                   ids_host: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """w, u [K+B,D] of the sorted candidate slots, up to date for step `now`: w on `device` (the logits' leaf),
        u where the update will run. batch_ids [B·world] (on `device`; ids_host: the same in host memory) are
        the global batch: what the ring cache reads from the bank."""
        w, u = self.gather(slots.rows.to(self.device), now)
        return w.to(device, non_blocking=True), u

    def commit(self, slots: Slots, batch_ids: torch.Tensor, before: tuple[torch.Tensor, torch.Tensor],
               after: tuple[torch.Tensor, torch.Tensor], step: int, ok: torch.Tensor | None) -> None:
        """After step `step`'s update of the candidate slots (before/after: w, u [K+B,D] where the update ran):
        every duplicate slot takes its id's valid slot's row, so one value is written per row. ok: a 0-d bool
        tensor (the loss was finite), None: it was. A skipped step leaves the stored rows and `last` as they were:
        the correction applies its zero-gradient update when the rows are next read. Every rank."""
        if self.writer:
            rows, src = slots.rows.to(self.device), slots.src.to(self.device)
            w, u = (x.index_select(0, src) for x in after)
            last = torch.full((), step, dtype=torch.int64, device=self.device)
            if ok is not None:
                stored_w, stored_u, stored_last = self.read(rows)
                w, u = torch.where(ok, w, stored_w), torch.where(ok, u, stored_u)
                last = torch.where(ok, last, stored_last)
            self.write(rows, w, u, last.expand(rows.shape[0]).contiguous())
        self.sync_ranks()

    # ---- life ------------------------------------------------------------------------------------------------

    def flush(self) -> None:
        """The storage holds every row's newest value."""

    def checkpoint(self, step: int) -> dict:
        raise NotImplementedError

    def committed(self, step: int) -> None:
        """Every rank, after rank 0 renamed the checkpoint of `step` into place."""

    def restore(self, state: dict) -> None:
        raise NotImplementedError

    def bring_up_to_date(self, now: int) -> None:
        """Correct every row that sat out since its last update to its state just before step `now`; `last` becomes
        now − 1. In chunks of fp32 copies; the writer writes, without a barrier (every rank calls it at the end of a
        run: the checkpoint that follows is where a shared bank's ranks meet)."""
        if not self.correction.active or not self.writer:
            return
        for a in range(0, self.n, CORRECTION_CHUNK_ROWS):
            ids = a + (self.last[a:a + CORRECTION_CHUNK_ROWS] < now - 1).nonzero().flatten()
            if ids.numel():
                w, u, last = self.read(ids)
                w, u = self.correction.catch_up(w, u, last, now)
                self.write_corrected(ids, w, u, torch.full_like(ids, now - 1))

    def write_corrected(self, ids: torch.Tensor, w: torch.Tensor, u: torch.Tensor, last: torch.Tensor) -> None:
        """How bring_up_to_date writes a chunk (an mmap bank: undoably)."""
        self.write(ids, w, u, last)

    def close(self) -> None:
        pass

    def table(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """weight, momentum, last as stored (the storage's own tensors; the ring cache's rows: flush first)."""
        return self.weight, self.momentum, self.last


class TensorRows(Rows):
    """Tensors of this process (replicated on every rank): on the training device, or in host memory."""

    def __init__(self, weight: torch.Tensor, momentum: torch.Tensor, last: torch.Tensor,
                 correction: Correction | None = None):
        self.weight, self.momentum, self.last = weight, momentum, last
        self.n, self.dim = weight.shape
        self.dtype, self.device = weight.dtype, weight.device
        self.correction = correction or Correction()

    @classmethod
    def initial(cls, n: int, dim: int, dtype: torch.dtype, init_std: float, generator: torch.Generator | None,
                device: torch.device, correction: Correction | None = None) -> TensorRows:
        """W ~ N(0, init_std²) drawn on the CPU with `generator` (the same numbers on every device), momentum 0,
        last −1."""
        weight = (torch.randn(n, dim, generator=generator) * init_std).to(dtype).to(device)
        return cls(weight, torch.zeros(n, dim, dtype=dtype, device=device),
                   torch.full((n,), -1, dtype=torch.int64, device=device), correction)

    def read(self, ids):
        work = self.work_dtype
        if ids is None:
            return self.weight.to(work), self.momentum.to(work), self.last
        ids = ids.to(self.device)
        return (self.weight.index_select(0, ids).to(work), self.momentum.index_select(0, ids).to(work),
                self.last.index_select(0, ids))

    def write(self, ids, w, u, last):
        if not self.writer:
            return
        if ids is None:  # every row: nothing to copy where the update ran on the storage itself
            for dst, src in ((self.weight, w), (self.momentum, u)):
                if src.data_ptr() != dst.data_ptr():
                    dst.copy_(src)
            self.last.copy_(last)
            return
        ids = ids.to(self.device)
        self.weight.index_copy_(0, ids, w.to(self.device, self.dtype))
        self.momentum.index_copy_(0, ids, u.to(self.device, self.dtype))
        self.last.index_copy_(0, ids, last.to(self.device))

    def checkpoint(self, step: int) -> dict:
        """The tensors themselves (serialise them before the next step)."""
        return {"kind": "tensors", "weight": self.weight, "momentum": self.momentum, "last": self.last}

    def restore(self, state: dict) -> None:
        if state.get("kind") != "tensors":
            raise BankError(f"the checkpoint's bank is a {state.get('kind')} bank; these rows are tensors")
        for name in ("weight", "momentum", "last"):
            mine, saved = getattr(self, name), state[name]
            if saved.shape != mine.shape or saved.dtype != mine.dtype:
                raise BankError(f"the checkpoint's bank {name} is {tuple(saved.shape)} {saved.dtype}; this bank's "
                                f"is {tuple(mine.shape)} {mine.dtype}")
            if self.writer:
                mine.copy_(saved)
        self.sync_ranks()
