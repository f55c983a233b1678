"""Rows in files, one copy per node: `host` (a folder in shared memory, /dev/shm) or `mmap` (a disk folder, for N
beyond host memory). folder/meta.json (format, run id, N, D, dtype, owner, the step of the newest checkpoint in place),
weight.bin, momentum.bin, last.bin, mapped MAP_SHARED by every local rank; an mmap bank also keeps the undo
journals of model/bank/journal.py. A host bank is saved in checkpoints like tensors (the folder does not survive a
reboot) and removed when the run ends; an mmap bank is referred to by its checkpoints, never copied.

One writer per node. Every rank computes the same row update (the same gathered rows, the all-reduced row
gradient), so local rank 0 alone writes (duplicate slots carry equal values: the writes are idempotent) and the
node's ranks meet at a barrier of a gloo group of the node (`sync_ranks`) before anyone reads for the next step.

Why no read races a write (under NCCL too, where a collective returns to the host before the peers have entered it,
so "the writer has left the all-reduce" says nothing about the others). A row the writer writes during step t is
either
  (a) computed from step t's all-reduced row gradient: the host write waits for that value (a device-to-host copy,
      or the event of one), which exists only after every rank's all-reduce kernel ran, which each rank launches
      after its own reads of step t; or
  (b) a row that left the ring cache `lag` ≥ 1 steps earlier (model/bank/ring_cache.py): every rank still serves
      it from its own eviction queue during step t and reads it from the bank only after the barrier that ends the
      step in which it is written.
Reads of step t + 1 come after that barrier. So correctness rests on the data dependency of (a) and on the queue
of (b), not on the order of the collective calls; a ring cache's write-back lag of 0 falls under (a) (its rows are
the step's own), so every lag is safe, and the default lag of 2 only keeps the host from waiting on the GPU.

With several nodes the folder gets a subfolder per node (node0/, node1/, ...), so nodes that share a file system
never write one file; the copies share one run id, so rank 0's checkpoint reference resumes every node's copy.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import uuid
from pathlib import Path

import numpy as np
import torch

from model import distributed as dist
from model.bank.correction import Correction
from model.bank.journal import CORRECTION_UNDO, NP_BITS, UndoJournal
from model.bank.rows import BankError, TensorRows, dtype_name
from model.folder_lock import LOCK_NAME, lock_folder, unlock

FORMAT = "pic-bank-v1"
KINDS = ("host", "mmap")
INIT_CHUNK_ROWS = 1 << 18  # rows per chunk of the N(0, σ²) initialisation (same numbers as one torch.randn(N, D))
BANK_FILES = ("weight.bin", "momentum.bin", "last.bin", "meta.json")


class BankFileError(BankError):
    pass


def default_host_dir(run_dir: str | os.PathLike) -> str:
    """/dev/shm/pic-<uid>-<run name>-<hash of the run folder>-bank: two runs of one name in different out_dirs
    must not map (and truncate) each other's bank."""
    key = hashlib.sha1(str(Path(run_dir).resolve()).encode("utf-8", "surrogateescape")).hexdigest()[:10]
    return f"/dev/shm/pic-{os.getuid()}-{Path(run_dir).name}-{key}-bank"


def _map(path: Path, dtype: torch.dtype, shape: tuple[int, ...], create: bool) -> tuple[np.memmap, torch.Tensor]:
    """A MAP_SHARED mapping of `path` as a torch tensor (bf16: the uint16 bits viewed as bf16). create: a sparse file
    of the right size (pages are allocated on first write)."""
    holder = np.int64 if dtype == torch.int64 else NP_BITS[dtype]
    mm = np.memmap(path, dtype=holder, mode="w+" if create else "r+", shape=shape)
    raw = getattr(mm, "_mmap", None)
    if raw is not None and hasattr(raw, "madvise"):
        # Rows are read at random: without this the kernel reads ahead ~128 KB around every faulting 256-byte row
        # (measured at N = 1e8 on a 51 GB file: 400-500 MB/s of reads, the hot rows evicted by the read-ahead).
        raw.madvise(mmap.MADV_RANDOM)
    t = torch.from_numpy(mm)
    return mm, (t.view(dtype) if dtype == torch.bfloat16 else t)


def read_meta(folder: Path) -> dict:
    path = Path(folder) / "meta.json"
    if not path.is_file():
        raise BankFileError(f"bank file {folder} not found (no {path.name})")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BankFileError(f"bank file {folder}: unreadable meta.json ({e})") from None
    if meta.get("format") != FORMAT:
        raise BankFileError(f"bank file {folder}: not a PIC bank (format {meta.get('format')!r})")
    return meta


class FileRows(TensorRows):
    """W, momentum, last of a host or mmap bank: files in one folder, mapped by every local rank. The local rank 0
    locks the folder (one process per bank folder), creates and initialises a new bank (the other local ranks wait,
    then map it) and is the only writer."""

    temporary = False  # removed when closed (a host bank: the checkpoints hold its rows)

    def __init__(self, kind: str, folder: str | os.PathLike, num_instances: int, dim: int, dtype: torch.dtype,
                 init_std: float = 0.01, generator: torch.Generator | None = None,
                 correction: Correction | None = None, create: bool | None = None, init: str = "randn"):
        if kind not in KINDS:
            raise ValueError(f"file rows are host or mmap, got {kind!r}")
        self.kind, self.base_folder = kind, Path(folder)
        self.group, local_rank, local_world = dist.local_group()
        self.writer = local_rank == 0
        # One copy per node. With several nodes each gets its own subfolder node<i>: on a shared file system the
        # nodes' writers must not write one file (and without LOCAL_WORLD_SIZE every rank is its own node).
        self.nodes = nodes = dist.world() // local_world
        self.folder = self.base_folder / f"node{dist.rank() // local_world}" if nodes > 1 else self.base_folder
        exists = (self.folder / "meta.json").exists()
        self._lock = None
        if self.writer:  # one process per bank folder (model/folder_lock.py), before anything in it is touched
            self.folder.mkdir(parents=True, exist_ok=True)
            self._lock = lock_folder(self.folder, "bank folder", BankFileError)
            if kind == "host" and exists and self._holds_mmap_bank():
                self._unlock()
                raise BankFileError(f"bank folder {self.folder} holds a memory-mapped bank (its rows are not in any "
                                    f"checkpoint): a host bank would overwrite it; give pic.bank_file another folder")
        self.sync_ranks()  # every local rank looked before the writer may create it: they agree on `created`
        self.created = (kind == "host" or not exists) if create is None else create
        run_id = uuid.uuid4().hex
        if nodes > 1:  # one id for the nodes' copies: a checkpoint (written by rank 0) names all of them
            box = [run_id]
            torch.distributed.broadcast_object_list(box, src=0)
            run_id = box[0]
        n, shape = int(num_instances), (int(num_instances), int(dim))
        if self.created and self.writer:
            self._remove_stale(n * (2 * dim * torch.finfo(dtype).bits // 8 + 8))
            self.meta = {"format": FORMAT, "kind": kind, "run_id": run_id, "num_instances": n, "dim": int(dim),
                         "dtype": dtype_name(dtype), "step": 0}
            self._open(shape, dtype, create=True)
            self._initialise(init_std, generator, init)
            self._write_meta()
        self.sync_ranks()
        if not (self.created and self.writer):
            self.meta = read_meta(self.folder)
            self.check_shape(self.meta, n, int(dim), dtype)
            self._open(shape, dtype, create=False)
        super().__init__(self.weight, self.momentum, self.last, correction)
        self.device = torch.device("cpu")
        self.base = int(self.meta["step"])  # rows with last < base hold their checkpoint value (the journal's rule)
        self.journal = UndoJournal(self.folder, (self.weight, self.momentum, self.last)) if kind == "mmap" else None
        if self.created and self.journal is not None and self.writer:
            self.journal.start(0)

    # ---- files ----------------------------------------------------------------------------------------------

    def _remove_stale(self, need: int) -> None:
        """Before a new bank is made: the files of an earlier one (a host bank left by a killed run: the lock we
        hold says its process is gone) are removed first, so that their space counts as free; then the room is
        checked (the files are sparse: a full /dev/shm or disk would only show up as a SIGBUS mid-run)."""
        stale = [p for p in (*(self.folder / n for n in BANK_FILES), *self.folder.glob("journal-*.bin"),
                             self.folder / CORRECTION_UNDO) if p.exists()]
        freed = sum(p.stat().st_blocks * 512 for p in stale)
        for p in stale:
            p.unlink()
        if freed >= 1 << 20:
            print(f"note: removed {freed / 1e9:.2f} GB of a bank left in {self.folder} by an earlier process",
                  flush=True)
        st = os.statvfs(self.folder)
        if st.f_bavail * st.f_frsize < need:
            raise BankFileError(f"{self.folder} has {st.f_bavail * st.f_frsize / 1e9:.2f} GB free, the bank needs "
                                f"{need / 1e9:.2f} GB (pic.bank_file: a folder with room; Docker: --shm-size)")

    def _open(self, shape: tuple[int, int], dtype: torch.dtype, create: bool) -> None:
        self._mm_w, self.weight = _map(self.folder / "weight.bin", dtype, shape, create)
        self._mm_u, self.momentum = _map(self.folder / "momentum.bin", dtype, shape, create)
        self._mm_l, self.last = _map(self.folder / "last.bin", torch.int64, shape[:1], create)

    def _holds_mmap_bank(self) -> bool:
        """An existing folder's bank is an mmap one (meta.json says so, or, before it did, it has undo journals)."""
        try:
            kind = json.loads((self.folder / "meta.json").read_text()).get("kind")
        except (OSError, ValueError):
            kind = None
        return kind == "mmap" or (kind is None and any(self.folder.glob("journal-*.bin")))

    def _initialise(self, init_std: float, generator: torch.Generator | None, init: str = "randn") -> None:
        """W ~ N(0, init_std²) drawn in chunks with the generator: the same numbers as the device bank's
        torch.randn(N, D); momentum 0 and last −1 (the momentum file is sparse: zero pages cost nothing).
        init="tile" (benchmarks only): one chunk of random rows repeated, written at disk speed."""
        n, d = self.weight.shape
        tile = None
        for a in range(0, n, INIT_CHUNK_ROWS):
            b = min(a + INIT_CHUNK_ROWS, n)
            if init == "tile":
                if tile is None:
                    tile = (torch.randn(INIT_CHUNK_ROWS, d, generator=generator) * init_std).to(self.weight.dtype)
                self.weight[a:b] = tile[:b - a]
                continue
            self.weight[a:b] = (torch.randn(b - a, d, generator=generator) * init_std).to(self.weight.dtype)
        self.last.fill_(-1)
        self.flush()

    def set_owner(self, run_dir: str) -> None:
        """Writer: record the run folder that trains on this bank in meta.json ("owner"), so that a run which
        finds the folder without resuming a checkpoint can say whose it is."""
        if self.writer and self.meta.get("owner") != run_dir:
            self.meta["owner"] = run_dir
            self._write_meta()

    def _write_meta(self) -> None:
        tmp = self.folder / "meta.json.tmp"
        tmp.write_text(json.dumps(self.meta))
        os.replace(tmp, self.folder / "meta.json")

    def check_shape(self, meta: dict, n: int, d: int, dtype: torch.dtype) -> None:
        for key, value in {"num_instances": n, "dim": d, "dtype": dtype_name(dtype)}.items():
            if meta.get(key) != value:
                raise BankFileError(f"bank file {self.folder} has {key}={meta.get(key)!r} but this run has "
                                    f"{key}={value!r}")
        itemsize = torch.empty((), dtype=dtype).element_size()
        for name, size in (("weight.bin", n * d * itemsize), ("momentum.bin", n * d * itemsize), ("last.bin", 8 * n)):
            found = (self.folder / name).stat().st_size if (self.folder / name).exists() else -1
            if found != size:
                raise BankFileError(f"bank file {self.folder / name}: {found} bytes, expected {size}")

    def flush(self) -> None:
        """msync the mappings (and fsync: np.memmap.flush is an msync of the whole mapping)."""
        for mm in (self._mm_w, self._mm_u, self._mm_l):
            mm.flush()

    def sync_ranks(self) -> None:
        if self.group is not None:
            torch.distributed.barrier(group=self.group)

    # ---- rows -----------------------------------------------------------------------------------------------

    def read(self, ids):
        if ids is None:  # copies: an update in place on the mapping would bypass `write` (and the journal)
            return (self.weight.to(self.work_dtype, copy=True), self.momentum.to(self.work_dtype, copy=True),
                    self.last.clone())
        return super().read(ids)

    def write(self, ids, w, u, last):
        """Writer only: an mmap bank journals the old value of rows not yet written since the checkpoint first."""
        if not self.writer:
            return
        if self.journal is not None:
            self.journal.record(torch.arange(self.n) if ids is None else ids.cpu(), self.base)
        super().write(ids, w, u, last)

    def write_corrected(self, ids, w, u, last):
        if self.journal is not None:  # the chunk's old rows, replacing the previous chunk's (see journal.py)
            self.journal.record_chunk(ids)
        super().write(ids, w, u, last)  # TensorRows.write: not the checkpoint's journal

    def bring_up_to_date(self, now: int) -> None:
        if self.journal is not None and self.writer and self.correction.active:
            self.meta["corrected"] = now  # before the first chunk: a checkpoint before `now` can no longer resume
            self._write_meta()
        super().bring_up_to_date(now)
        if self.journal is not None and self.writer:
            self.flush()
            self.journal.end_chunks()

    # ---- checkpoints ----------------------------------------------------------------------------------------

    def checkpoint(self, step: int) -> dict:
        """Every rank. host: the mapped tensors (saved like tensors). mmap: the writer flushes the mapping, starts
        journal-<step> (every older journal is kept until `committed`) and the checkpoint gets a reference."""
        if self.journal is None:
            return super().checkpoint(step)
        if self.writer and step != self.base:
            self.flush()
            self.journal.start(step)
        self.base = step
        self.sync_ranks()
        return self.reference(step)

    def committed(self, step: int) -> None:
        """Every rank, once rank 0 has renamed the checkpoint of `step` into place: an mmap bank's meta.json records
        it as the newest checkpoint, and the journals before the one it replaced (now prev.pt) are deleted."""
        if self.journal is None:
            return
        if self.nodes > 1:  # the other nodes' writers: rank 0's rename is done once every rank is here
            torch.distributed.barrier(group=dist.host_group())
        if self.writer and step == self.base and int(self.meta["step"]) != step:
            self.journal.prune(before=int(self.meta["step"]))
            self.meta["step"] = step
            self._write_meta()

    def reference(self, step: int) -> dict:
        return {"kind": "file", "storage": self.kind, "path": str(self.base_folder), "run_id": self.meta["run_id"],
                "num_instances": self.n, "dim": self.dim, "dtype": dtype_name(self.dtype), "step": step,
                "nodes": self.nodes}

    def restore(self, state: dict) -> None:
        """host: the checkpoint's rows copied in. mmap: the file rolled back to the checkpoint (its undo journals);
        every mismatch is one BankFileError naming the file."""
        if self.journal is None:
            return super().restore(state)
        step = int(state["step"])
        if self.created and state.get("run_id") != self.meta["run_id"]:  # nothing was there: a fresh (useless)
            # file was made; remove it again
            self.close(remove=True)
            raise BankFileError(f"bank file {self.folder} not found; the checkpoint refers to {state.get('path')} "
                                f"(step {step})")
        if Path(state.get("path", "")).resolve() != self.base_folder.resolve():
            raise BankFileError(f"the checkpoint's bank file is {state.get('path')}, this run maps "
                                f"{self.base_folder}: set pic.bank_file to it")
        if state.get("run_id") != self.meta["run_id"]:
            raise BankFileError(f"bank file {self.folder} belongs to another run (id {self.meta['run_id']}, the "
                                f"checkpoint expects {state.get('run_id')}); point pic.bank_file at the run's file")
        corrected = self.meta.get("corrected")
        if corrected is not None and step < corrected:
            raise BankFileError(f"bank file {self.folder} was corrected at the end of its run (step {corrected}) "
                                f"after this checkpoint (step {step}): its rows cannot be rolled back; resume the "
                                f"run's checkpoint of step {corrected}")
        if self.writer:
            journals = self.journal.steps()
            if step not in journals:
                raise BankFileError(
                    f"bank file {self.folder} cannot be rolled back to step {step}: no journal-{step:012d}.bin (the "
                    f"file is at checkpoint step {self.meta['step']}; journals: {journals})")
            self.journal.roll_back(step)  # the file now equals checkpoint `step`
            self.flush()
            self.meta["step"] = step
            self._write_meta()
        self.base = step
        self.sync_ranks()

    def _unlock(self) -> None:
        unlock(self._lock)
        self._lock = None

    def close(self, remove: bool | None = None) -> None:
        """remove (default: `temporary`): delete the bank's files, the lock file last, before the lock is released
        (no other process can have started a bank in the folder in between), then the folder when that empties
        it."""
        remove = self.temporary if remove is None else remove
        if self.journal is not None:
            self.journal.close()
        if not remove:
            self.flush()
        elif self.writer:
            for p in [*(self.folder / n for n in BANK_FILES), *self.folder.glob("journal-*.bin"),
                      self.folder / CORRECTION_UNDO, self.folder / LOCK_NAME]:
                p.unlink(missing_ok=True)
        self._unlock()
        if remove and self.writer:
            try:  # the folder, and node<i>'s parent once every node's copy is gone
                self.folder.rmdir()
                if self.folder != self.base_folder:
                    self.base_folder.rmdir()
            except OSError:
                pass


def unresumed_bank_message(folder: Path, meta: dict) -> str:
    """An mmap bank folder that a run found without resuming a checkpoint: whose it is (meta.json's owner, which
    banks made before it was recorded lack: then the run id), in one line."""
    owner = meta.get("owner")
    if owner:
        gone = "" if Path(owner).is_dir() else ", a folder that no longer exists"
        whose = f"belongs to the run in {owner} (checkpoint step {meta.get('step')}{gone})"
    else:
        whose = (f"belongs to run id {meta.get('run_id')} (checkpoint step {meta.get('step')}; its run folder is "
                 f"not recorded)")
    return (f"bank file {folder} exists but no checkpoint is resumed: it {whose}; continue that run (its "
            f"run.out_dir/run.name) with --run.resume=auto, give this run another pic.bank_file, or delete the folder "
            f"to start fresh")


def adopt(rows: FileRows, owner: str, continuing: bool) -> None:
    """A run that starts without a checkpoint on an mmap folder: a new bank is its own; an existing one only if it is
    this run's (`owner`), killed before its first checkpoint (`continuing`: the run asked to resume), which is rolled
    back to its initial rows (journal-0); anything else is refused in one line naming the owner."""
    if not rows.created:
        meta = rows.meta
        if int(meta["step"]) != 0 or not continuing or meta.get("owner") not in (None, owner):
            raise BankFileError(unresumed_bank_message(rows.folder, meta))
        rows.restore(rows.reference(0))
        if rows.writer:
            print(f"bank file {rows.folder}: rolled back to its initial rows (no checkpoint yet)", flush=True)
