"""The undo journal of a memory-mapped bank: every write goes through it, so a resume is exact after any kill.

A checkpoint at step s (the state before step s) flushes the mapping and starts `journal-<s>.bin` empty. Before the
writer overwrites a row whose `last` < s (its stored value is still the one of checkpoint s), it appends the row's
old (row, last, w, u) to that journal and flushes the append to the OS before changing the mapping; a row written
again later has last ≥ s and is not journaled twice, so the journal grows by at most one record per row per
checkpoint interval (with the full soft-max: every row once per interval, a copy of the bank, which only a small
bank can afford: the B×N logits rule out a large one). Resuming from checkpoint s applies the journals of s and
later ones, newest first, which restores every changed row to its value at s, bit for bit; the journal of the
checkpoint before the newest is kept, so the previous checkpoint (prev.pt) can be resumed too. Older journals are
deleted only once the new checkpoint's file is in place (`prune`, after its rename): a kill in between leaves last.pt
and prev.pt from before, and both must still roll back.

The end-of-run correction rewrites every stale row (the whole bank, 52 GB at N = 10⁸): journaling it into the
checkpoint's journal would double the disk. It goes chunk by chunk instead, each chunk's old rows in
`correction-undo.bin` (replaced per chunk) before the chunk is written. A kill mid-chunk is undone by that file at
the next resume (rows of finished chunks are up to date, last = now − 1, and are not corrected again); the bank's
meta.json records the step it was corrected for, and a checkpoint before it (prev.pt) is then refused: its rows
were rewritten without an undo record.

Durability: exact across killed processes (the appends and the mapping's pages are in the page cache); across a
power cut the journal is not fsynced per step, so only the file state of the last checkpoint's msync is guaranteed.
A record cut short by a kill is ignored: its rows were not yet changed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

NP_BITS = {torch.float32: np.float32, torch.bfloat16: np.uint16, torch.float16: np.float16,
           torch.float64: np.float64}  # numpy holders of the storage dtypes (bf16: its bits)
CORRECTION_UNDO = "correction-undo.bin"


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def _tensor(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


class UndoJournal:
    """Undo records of the rows of `tensors` (weight [N,D], momentum [N,D], last [N]: the mapping) in `folder`."""

    def __init__(self, folder: Path, tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
        self.folder = folder
        self.weight, self.momentum, self.last = tensors
        self.dtype = self.weight.dtype
        row = (NP_BITS[self.dtype], (self.weight.shape[1],))
        self.record_type = np.dtype([("row", "<i8"), ("last", "<i8"), ("w", *row), ("u", *row)])
        self._file = None  # the open journal of the current checkpoint

    def path(self, step: int) -> Path:
        return self.folder / f"journal-{step:012d}.bin"

    def steps(self) -> list[int]:
        return sorted(int(p.stem.split("-")[1]) for p in self.folder.glob("journal-*.bin"))

    def start(self, step: int) -> None:
        """A checkpoint of step `step` (the mapping already flushed): its journal starts empty. Older journals stay
        until the checkpoint's file is in place (`prune`): until then the checkpoints before it are the run's."""
        self.close()
        self.path(step).write_bytes(b"")

    def prune(self, before: int) -> None:
        """Delete the journals of steps before `before` (the checkpoint that has just become prev.pt): no checkpoint
        file of the run can be rolled back to them any more."""
        for s in self.steps():
            if s < before:
                self.path(s).unlink()

    def record(self, ids: torch.Tensor, base: int) -> None:
        """Before rows `ids` are overwritten: append the old value of those whose last < base (not yet recorded)."""
        ids = torch.unique(ids)
        keep = ids[self.last.index_select(0, ids) < base]
        if keep.numel():
            if self._file is None:
                self._file = open(self.path(base), "ab")  # noqa: SIM115 - kept open across steps
            self._append(self._file, keep)

    def record_chunk(self, ids: torch.Tensor) -> None:
        """The end-of-run correction: the old value of a chunk's rows, replacing the previous chunk's."""
        with open(self.folder / CORRECTION_UNDO, "wb") as f:
            self._append(f, ids)

    def end_chunks(self) -> None:
        (self.folder / CORRECTION_UNDO).unlink(missing_ok=True)

    def _append(self, f, ids: torch.Tensor) -> None:
        rec = np.empty(ids.numel(), dtype=self.record_type)
        rec["row"] = ids.numpy()
        rec["last"] = self.last.index_select(0, ids).numpy()
        rec["w"] = _bits(self.weight.index_select(0, ids))
        rec["u"] = _bits(self.momentum.index_select(0, ids))
        f.write(rec.tobytes())
        f.flush()  # in the OS before the mapping changes: a killed process cannot lose it

    def roll_back(self, step: int) -> None:
        """Restore every row to its value at checkpoint `step`: an interrupted correction chunk first, then the
        journals of `step` and later, newest first; the later ones are deleted and journal-<step> restarts empty."""
        self.close()
        undo = self.folder / CORRECTION_UNDO
        if undo.exists():
            self._apply(self._records(undo))
            undo.unlink()
        for s in reversed(self.steps()):
            if s < step:
                break
            self._apply(self._records(self.path(s)))
            if s > step:
                self.path(s).unlink()
        self.path(step).write_bytes(b"")

    def _records(self, path: Path) -> np.ndarray:
        raw = path.read_bytes()
        whole = len(raw) // self.record_type.itemsize * self.record_type.itemsize  # a cut-short record: ignored
        return np.frombuffer(raw[:whole], dtype=self.record_type)

    def _apply(self, rec: np.ndarray) -> None:
        if not rec.size:
            return
        # a row journaled twice in one interval (rewritten unchanged by a skipped step) takes its first record
        _, first = np.unique(rec["row"], return_index=True)
        rec = rec[first]
        rows = torch.from_numpy(np.ascontiguousarray(rec["row"]))
        self.weight.index_copy_(0, rows, _tensor(rec["w"], self.dtype))
        self.momentum.index_copy_(0, rows, _tensor(rec["u"], self.dtype))
        self.last.index_copy_(0, rows, torch.from_numpy(np.ascontiguousarray(rec["last"])))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
