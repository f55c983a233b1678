"""Where the instance bank's rows live (issue 17): W [N,D] and momentum [N,D] in fp32, bf16 or fp16, and last [N] int64.

Kinds (`pic.bank_storage`):
  device  tensors of this process: the InstanceBank's registered buffers (the training device, or host memory with
          `pic.bank_device=cpu`). Replicated on every rank. Saved in checkpoints. The default, unchanged.
  host    one copy per node: three files in shared memory (a folder under /dev/shm) mapped MAP_SHARED by every local
          rank. Saved in checkpoints like the device bank (the folder does not survive a reboot).
  mmap    the same code on a disk file (`pic.bank_file`): N larger than host memory. The page cache holds the rows
          in use; checkpoints refer to the file (never copy it) and an undo journal makes resume exact (below).

Low-precision rows (`pic.bank_dtype=bf16|fp16`): the gathered rows are widened to fp32, corrected, used for the
logits and updated in fp32, and rounded to the storage dtype (round to nearest even) when written back.

Write rule for a shared (host / mmap) bank. Every rank computes the same row update (the same gathered rows, the
all-reduced row gradient), so one copy per node needs one writer: local rank 0 writes the K+B candidate slots
(duplicate slots carry identical values, so the scatter is idempotent) and then the node's ranks meet at a barrier
of a gloo group of the node's ranks, before anyone gathers rows for the next step. Reads cannot race the write: a
rank's gather for step t happens before it enters step t's gradient all-reduce, and the writer writes after that
all-reduce returned. Across nodes each node holds its own copy, written the same way, so the replicas stay equal:
with more than one node the folder gets a subfolder per node (node0/, node1/, ...), so nodes that share a file
system never write one file, and ranks launched without LOCAL_WORLD_SIZE (each then its own node) never share a
writer; the copies share one run id, so rank 0's checkpoint reference resumes every node's copy.
Cost: one gloo barrier per step (≈ 0.1-0.5 ms on one host) and the scatter done by one process instead of every
rank. With the ring's cache (pic.bank_cache, model/recent_rows.py; the default for host and mmap banks) every rank
keeps the same cache, reads only the batch's B rows, and the writer writes only the rows leaving the ring, `lag`
steps late; the same barrier orders those writes before the next step's reads.

Exact resume of an mmap bank (undo journal). A checkpoint at step s (the state before step s) flushes the mapping
(msync) and records {path, run id, N, D, dtype, s}; the folder's `journal-<s>.bin` is started empty. Before the
writer overwrites a row whose `last` < s (its stored value is still the one of checkpoint s), it appends the row's
old (row, last, w, u) to that journal and flushes the append to the OS before changing the mapping; a row written
again later has last ≥ s and is not journaled twice, so the journal grows by at most one record per row per
checkpoint interval. Resuming from checkpoint s applies the journals of checkpoint s and later ones, newest first,
which restores every changed row to its value at s, bit for bit. The journal of the checkpoint before the newest is
kept, so the previous checkpoint (prev.pt) can be resumed too. Durability: exact across killed processes (the
journal append and the mapping's pages are in the page cache); across a power cut the journal is not fsynced per
step, so only the file state of the last checkpoint's msync is guaranteed, not its rollback.
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
from model.folder_lock import LOCK_NAME, lock_folder, unlock

KINDS = ("device", "host", "mmap")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_NP_BITS = {torch.float32: np.float32, torch.bfloat16: np.uint16, torch.float16: np.float16}  # numpy holders
FORMAT = "pic-bank-v1"
INIT_CHUNK_ROWS = 1 << 18  # rows per chunk of the N(0, σ²) initialisation (same numbers as one torch.randn(N, D))


class BankFileError(ValueError):
    pass


def dtype_of(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"bank dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return next((k for k, v in DTYPES.items() if v == dtype), str(dtype))


def default_host_dir(run_dir: str | os.PathLike) -> str:
    """/dev/shm/pic-<uid>-<run name>-<hash of the run folder>-bank: two runs of one name in different out_dirs
    must not map (and truncate) each other's bank."""
    key = hashlib.sha1(str(Path(run_dir).resolve()).encode("utf-8", "surrogateescape")).hexdigest()[:10]
    return f"/dev/shm/pic-{os.getuid()}-{Path(run_dir).name}-{key}-bank"


def _map(path: Path, dtype: torch.dtype, shape: tuple[int, ...], create: bool) -> tuple[np.memmap, torch.Tensor]:
    """A MAP_SHARED mapping of `path` as a torch tensor (bf16: the uint16 bits viewed as bf16). create: a sparse file
    of the right size (pages are allocated on first write)."""
    holder = np.int64 if dtype == torch.int64 else _NP_BITS[dtype]
    mm = np.memmap(path, dtype=holder, mode="w+" if create else "r+", shape=shape)
    raw = getattr(mm, "_mmap", None)
    if raw is not None and hasattr(raw, "madvise"):
        # Rows are read at random: without this the kernel reads ahead ~128 KB around every faulting 256-byte row
        # (measured at N = 1e8 on a 51 GB file: 400-500 MB/s of reads, the hot rows evicted by the read-ahead).
        raw.madvise(mmap.MADV_RANDOM)
    t = torch.from_numpy(mm)
    return mm, (t.view(dtype) if dtype == torch.bfloat16 else t)


class FileStorage:
    """weight, momentum, last of a host or mmap bank: files in one folder, mapped by every local rank.

    folder/meta.json (format, run id, N, D, dtype, the step of the last checkpoint), weight.bin, momentum.bin,
    last.bin, and journal-<step>.bin (mmap kind). The local rank 0 creates and initialises a new folder (the other
    local ranks wait for it, then map it) and is the only writer."""

    def __init__(self, kind: str, folder: str | os.PathLike, num_instances: int, dim: int, dtype: torch.dtype,
                 init_std: float = 0.01, generator: torch.Generator | None = None, create: bool | None = None,
                 init: str = "randn"):
        if kind not in ("host", "mmap"):
            raise ValueError(f"FileStorage kind must be host or mmap, got {kind!r}")
        self.kind, self.base_folder = kind, Path(folder)
        self.n, self.d, self.dtype = int(num_instances), int(dim), dtype
        self.group, self.local_rank, self.local_world = dist.local_group()
        self.writer = self.local_rank == 0
        # One copy per node. With several nodes each gets its own subfolder node<i>: on a shared file system the
        # nodes' writers must not write one file (and without LOCAL_WORLD_SIZE every rank is its own node).
        self.nodes = nodes = dist.world() // self.local_world
        self.folder = self.base_folder / f"node{dist.rank() // self.local_world}" if nodes > 1 else self.base_folder
        meta_path = self.folder / "meta.json"
        exists = meta_path.exists()
        self._lock = None
        if self.writer:  # one process per bank folder (model/folder_lock.py), before anything in it is touched
            self.folder.mkdir(parents=True, exist_ok=True)
            self._lock = lock_folder(self.folder, "bank folder", BankFileError)
            if kind == "host" and exists and self._holds_mmap_bank():
                unlock(self._lock)
                raise BankFileError(f"bank folder {self.folder} holds a memory-mapped bank (its rows are not in any "
                                    f"checkpoint): a host bank would overwrite it; give pic.bank_file another folder")
        self.barrier()  # every local rank looked before the writer may create it: they agree on `created`
        if create is None:  # host: always a fresh copy (a checkpoint restores it); mmap: open what is there
            create = kind == "host" or not exists
        self.created = create
        run_id = uuid.uuid4().hex
        if nodes > 1:  # one id for the nodes' copies: a checkpoint (written by rank 0) names all of them
            box = [run_id]
            torch.distributed.broadcast_object_list(box, src=0)
            run_id = box[0]
        if create and self.writer:
            self.folder.mkdir(parents=True, exist_ok=True)
            for old in self.folder.glob("journal-*.bin"):
                old.unlink()
            self.meta = {"format": FORMAT, "kind": kind, "run_id": run_id, "num_instances": self.n, "dim": self.d,
                         "dtype": dtype_name(dtype), "step": 0}
            self._open(create=True)
            self._initialise(init_std, generator, init)
            self.flush()
            self._write_meta()
            if kind == "mmap":
                self._journal_path(0).write_bytes(b"")
        self.barrier()
        if not (create and self.writer):
            self.meta = self.read_meta(self.folder)
            self.check_shape(self.meta)
            self._open(create=False)
        self.base = int(self.meta["step"])  # rows with last < base hold their checkpoint value (mmap journal rule)
        self._journal = None
        self._rec = np.dtype([("row", "<i8"), ("last", "<i8"), ("w", _NP_BITS[dtype], (self.d,)),
                              ("u", _NP_BITS[dtype], (self.d,))])

    # ---- files ----------------------------------------------------------------------------------------------

    def _open(self, create: bool) -> None:
        nd = (self.n, self.d)
        if create:  # the files are sparse: a full /dev/shm or disk would only show up as a SIGBUS mid-run
            need = self.n * (2 * self.d * torch.finfo(self.dtype).bits // 8 + 8)
            st = os.statvfs(self.folder)
            if st.f_bavail * st.f_frsize < need:
                raise BankFileError(f"{self.folder} has {st.f_bavail * st.f_frsize / 1e9:.2f} GB free, the bank needs "
                                    f"{need / 1e9:.2f} GB (pic.bank_file: a folder with room; Docker: --shm-size)")
        self._mm_w, self.weight = _map(self.folder / "weight.bin", self.dtype, nd, create)
        self._mm_u, self.momentum = _map(self.folder / "momentum.bin", self.dtype, nd, create)
        self._mm_l, self.last = _map(self.folder / "last.bin", torch.int64, (self.n,), create)

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
        tile = None
        for a in range(0, self.n, INIT_CHUNK_ROWS):
            b = min(a + INIT_CHUNK_ROWS, self.n)
            if init == "tile":
                if tile is None:
                    tile = (torch.randn(INIT_CHUNK_ROWS, self.d, generator=generator) * init_std).to(self.dtype)
                self.weight[a:b] = tile[:b - a]
                continue
            self.weight[a:b] = (torch.randn(b - a, self.d, generator=generator) * init_std).to(self.dtype)
        self.last.fill_(-1)

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

    def _journal_path(self, step: int) -> Path:
        return self.folder / f"journal-{step:012d}.bin"

    @staticmethod
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

    def check_shape(self, meta: dict) -> None:
        want = {"num_instances": self.n, "dim": self.d, "dtype": dtype_name(self.dtype)}
        for key, value in want.items():
            if meta.get(key) != value:
                raise BankFileError(f"bank file {self.folder} has {key}={meta.get(key)!r} but this run has "
                                    f"{key}={value!r}")
        for name, items in (("weight.bin", self.n * self.d), ("momentum.bin", self.n * self.d), ("last.bin", self.n)):
            size = (self.folder / name).stat().st_size if (self.folder / name).exists() else -1
            itemsize = 8 if name == "last.bin" else torch.empty((), dtype=self.dtype).element_size()
            if size != items * itemsize:
                raise BankFileError(f"bank file {self.folder / name}: {size} bytes, expected {items * itemsize}")

    def flush(self) -> None:
        """msync the mappings (and fsync: np.memmap.flush is an msync of the whole mapping)."""
        for mm in (self._mm_w, self._mm_u, self._mm_l):
            mm.flush()

    def barrier(self) -> None:
        if self.group is not None:
            torch.distributed.barrier(group=self.group)

    # ---- rows -----------------------------------------------------------------------------------------------

    def write_rows(self, rows: torch.Tensor, w: torch.Tensor, u: torch.Tensor, last: torch.Tensor) -> None:
        """Writer only: rows [R] (duplicates allowed: identical values) get w, u [R,D] (cast to the storage dtype)
        and last [R]; mmap: old values of rows with last < base are journaled first."""
        rows = rows.cpu()
        if self.kind == "mmap":
            self._journal_rows(rows)
        self.weight.index_copy_(0, rows, w.to("cpu", self.dtype))
        self.momentum.index_copy_(0, rows, u.to("cpu", self.dtype))
        self.last.index_copy_(0, rows, last.cpu())

    def _journal_rows(self, rows: torch.Tensor) -> None:
        rows = torch.unique(rows)
        old_last = self.last.index_select(0, rows)
        keep = rows[old_last < self.base]
        if keep.numel() == 0:
            return
        rec = np.empty(keep.numel(), dtype=self._rec)
        rec["row"] = keep.numpy()
        rec["last"] = self.last.index_select(0, keep).numpy()
        bits = (lambda t: t.view(torch.int16).numpy().view(np.uint16)) if self.dtype == torch.bfloat16 else \
            (lambda t: t.numpy())
        rec["w"] = bits(self.weight.index_select(0, keep))
        rec["u"] = bits(self.momentum.index_select(0, keep))
        if self._journal is None:
            self._journal = open(self._journal_path(self.base), "ab")  # noqa: SIM115 - kept open across steps
        self._journal.write(rec.tobytes())
        self._journal.flush()  # in the OS before the mapping changes: a killed process cannot lose it

    # ---- checkpoints ----------------------------------------------------------------------------------------

    def checkpoint(self, step: int) -> dict:
        """Called on every rank at a checkpoint of the state before step `step`. mmap: the writer flushes the
        mapping and starts journal-<step>; returns what the checkpoint records."""
        if self.kind == "mmap" and self.writer and step != self.base:
            if self._journal is not None:
                self._journal.close()
                self._journal = None
            self.flush()
            self._journal_path(step).write_bytes(b"")
            for old in self.folder.glob("journal-*.bin"):  # keep the previous checkpoint's journal (prev.pt)
                if int(old.stem.split("-")[1]) < self.base:
                    old.unlink()
            self.meta["step"] = step
            self._write_meta()
        self.base = step
        self.barrier()
        return self.reference(step)

    def reference(self, step: int) -> dict:
        return {"kind": self.kind, "path": str(self.base_folder), "run_id": self.meta["run_id"],
                "num_instances": self.n, "dim": self.d, "dtype": dtype_name(self.dtype), "step": step,
                "nodes": self.nodes}

    def restore(self, ref: dict) -> None:
        """mmap: roll the file back to checkpoint `ref` (the undo journals of ref["step"] and later, newest
        first). Every mismatch is one BankFileError naming the file."""
        step = int(ref["step"])
        if self.created:  # nothing was there: a fresh (useless) file was made; remove it again
            self.close(remove=True)
            raise BankFileError(f"bank file {self.folder} not found; the checkpoint refers to {ref.get('path')} "
                                f"(step {step})")
        if Path(ref.get("path", "")).resolve() != self.base_folder.resolve():
            raise BankFileError(f"the checkpoint's bank file is {ref.get('path')}, this run maps {self.base_folder}: "
                                f"set pic.bank_file to it")
        if ref.get("run_id") != self.meta["run_id"]:
            raise BankFileError(f"bank file {self.folder} belongs to another run (id {self.meta['run_id']}, the "
                                f"checkpoint expects {ref.get('run_id')}); point pic.bank_file at the run's file")
        if self.writer:
            self.check_shape(self.meta)
            if self._journal is not None:
                self._journal.close()
                self._journal = None
            journals = sorted((int(p.stem.split("-")[1]), p) for p in self.folder.glob("journal-*.bin"))
            if step not in {s for s, _ in journals}:
                raise BankFileError(
                    f"bank file {self.folder} cannot be rolled back to step {step}: no journal-{step:012d}.bin (the "
                    f"file is at checkpoint step {self.meta['step']}; journals: {[s for s, _ in journals]})")
            for s, p in reversed(journals):
                if s < step:
                    break
                rec = np.fromfile(p, dtype=self._rec)
                if rec.size:
                    self._apply(rec)
                if s > step:
                    p.unlink()
            self._journal_path(step).write_bytes(b"")  # the file now equals checkpoint `step`
            self.flush()
            self.meta["step"] = step
            self._write_meta()
        self.base = step
        self.barrier()

    def _apply(self, rec: np.ndarray) -> None:
        # a row journaled twice in one interval (rewritten unchanged by a skipped step) takes its first record
        _, first = np.unique(rec["row"], return_index=True)
        rec = rec[first]
        rows = torch.from_numpy(np.ascontiguousarray(rec["row"]))
        w = torch.from_numpy(np.ascontiguousarray(rec["w"]))
        u = torch.from_numpy(np.ascontiguousarray(rec["u"]))
        if self.dtype == torch.bfloat16:
            w, u = w.view(torch.bfloat16), u.view(torch.bfloat16)
        self.weight.index_copy_(0, rows, w)
        self.momentum.index_copy_(0, rows, u)
        self.last.index_copy_(0, rows, torch.from_numpy(np.ascontiguousarray(rec["last"])))

    def close(self, remove: bool = False) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        self.flush()
        unlock(self._lock)
        self._lock = None
        if remove and self.writer:  # our files only; the folder too when that empties it
            for p in [*(self.folder / n for n in ("weight.bin", "momentum.bin", "last.bin", "meta.json", LOCK_NAME)),
                      *self.folder.glob("journal-*.bin")]:
                p.unlink(missing_ok=True)
            if not any(self.folder.iterdir()):
                self.folder.rmdir()
                if self.folder != self.base_folder:  # node<i>: the parent too once every node's copy is gone
                    try:
                        self.base_folder.rmdir()
                    except OSError:
                        pass
