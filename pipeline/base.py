"""The one batch contract every backend obeys, and the loader protocol.

Buffer ownership: a `Batch` yielded by a loader is valid until the loader's iterator is advanced again. Backends
that recycle buffers (DALI owns its output memory; FFCV and the pinned-memory torch path reuse theirs) are allowed
to overwrite the tensors of batch t when batch t+1 is produced. The training step consumes a batch before asking
for the next one; code that wants to keep a batch longer (tests, feature banks) must `.clone()` it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
import torch
import torch.utils.data

from pipeline.dataset import DataError
from pipeline.decode import DECODE_ERRORS
from pipeline.schedule import batch_rows

# ImageNet statistics, in [0, 1] units (torchvision's Normalize convention).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Batch(NamedTuple):
    """One training batch.

    images: float [B,3,H,W], normalised with ImageNet mean/std, on the target device (the large crop).
    ids:    int64 [B], the instance id of every image, read from the data (manifest / .beton field / DALI label),
            never derived from the position in the batch.
    crops:  extra crop groups for multi-crop (each float [B,3,h,w], same order of instances as `images`);
            empty for single-crop training.
    ids_host: the same ids in host memory (int64 [B], CPU), for a bank that lives on the host (pic.bank_cache):
            reading its rows then needs no copy of the ids back from the GPU (which would wait for the GPU).
    """

    images: torch.Tensor
    ids: torch.Tensor
    crops: tuple[torch.Tensor, ...] = ()
    ids_host: torch.Tensor | None = None


class Loader(Protocol):
    """What `train.py` needs from a backend.

    A loader is stateless across epochs: the order of epoch e (or window e, for the sliding-window scheduler) is a
    pure function of (seed, e), and so is the augmentation randomness of every batch, so that a run resumed at
    (epoch, batch) sees exactly the batches the uninterrupted run would have seen.
    """

    num_instances: int

    def __len__(self) -> int:
        """Batches per epoch (or per window)."""
        ...

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Yield the batches of epoch `epoch`, skipping the first `start_batch` of them."""
        ...


def to_device_async(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without making the host wait: on CUDA through pinned memory with a non-blocking
    copy (torch's pinned-memory cache keeps the staging block until the copy has run). A plain `.to("cuda")` of
    pageable memory waits for the copy, a sync per call; the loaders make one or two such copies per batch."""
    device = torch.device(device)
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def device_constant(values: tuple[float, ...], like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[1,C,1,1] constant (e.g. IMAGENET_MEAN) on `like`'s device, in `dtype` (default `like`'s), made once per
    (values, device, dtype): `torch.tensor(values, device="cuda")` per batch would be a blocking copy per batch."""
    dtype = dtype or like.dtype
    key = (values, like.device, dtype)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = to_device_async(torch.tensor(values, dtype=dtype).view(1, -1, 1, 1), like.device)
    return _CONSTANTS[key]


class BadFiles:
    """The run's record of undecodable files: instance id -> reason, each named once per run in one list.

    With a path (the run folder's `bad_files.tsv`), every new bad file is appended as a line
    `instance_id<TAB>path<TAB>reason` (flushed at once). One process writes the list: rank 0. Under torchrun rank
    r > 0 appends its finds to a journal of its own (`.bad_files.rank<r>.tsv`, so no two processes append to one
    file), and rank 0 merges the journals into the list at every checkpoint and at the end (`merge`). Every rank
    visits every id over a run (its slices of the global orders), so before naming a new one a rank reads the other
    ranks' records: a file another rank named is not named again. FFCV's converter rejects are recorded like any
    other. A resumed run reads the list and the journals back, so it neither decodes nor names them again. The
    console gets one note at the first bad file of a process and a summary line at the end (`summary()`), not a
    warning per file per epoch.
    """

    HEADER = "instance_id\tpath\treason\n"

    def __init__(self, path: str | os.PathLike | None = None, index=None, announce: bool = True, rank: int = 0):
        self.list_path = Path(path) if path else None  # the run's one list
        self.path = self.list_path  # where this process appends: the list (rank 0) or its journal
        if self.list_path is not None and rank:
            self.path = self.list_path.with_name(f".{self.list_path.stem}.rank{rank}{self.list_path.suffix}")
        self.index = index
        self.announce = announce  # False in worker processes: the main process names what they report
        self.reasons: dict[int, str] = {}
        self.found_here = 0  # found by this process (not read back from an earlier run)
        self._read_to: dict[Path, int] = {}  # list or journal -> bytes of it read by `_read_others`
        self.listed: set[int] = set()  # ids in the list file (rank 0 merges the others into it)
        if self.list_path is not None:
            self.listed = set(_read_bad_list(self.list_path))
        self.reasons.update(self.read_all())

    def _journals(self) -> list[Path]:
        """The ranks' journals (and, from runs written before they were hidden, `bad_files.rank<r>.tsv`)."""
        p = self.list_path
        return sorted(p.parent.glob(f".{p.stem}.rank*{p.suffix}")) + sorted(p.parent.glob(f"{p.stem}.rank*{p.suffix}"))

    def read_all(self) -> dict[int, str]:
        """Every record of this run folder (the list, every journal); a line cut short by a kill is skipped."""
        if self.list_path is None:
            return {}
        found = _read_bad_list(self.list_path)
        for f in self._journals():
            found.update(_read_bad_list(f))
        return found

    def _read_others(self) -> None:
        """Add what the list and the other ranks' journals gained since the last look: only the bytes appended
        since, so each bad file costs a read of the new lines, not of every list again."""
        if self.list_path is None:
            return
        for f in (self.list_path, *self._journals()):
            if f == self.path or not f.is_file():
                continue  # this process's own lines are in self.reasons already
            with open(f, "rb") as fh:
                fh.seek(self._read_to.get(f, 0))
                chunk = fh.read()
            self._read_to[f] = self._read_to.get(f, 0) + chunk.rfind(b"\n") + 1  # whole lines only
            for known, why in _parse_bad_lines(chunk).items():
                self.reasons.setdefault(known, why)

    def merge(self) -> int:
        """Rank 0: append the journals' records the list lacks to it; returns how many."""
        if self.list_path is None or self.path != self.list_path:
            return 0
        missing = {i: r for i, r in self.read_all().items() if i not in self.listed}
        self.reasons.update({i: r for i, r in missing.items() if i not in self.reasons})
        self._append(missing)
        return len(missing)

    def __contains__(self, iid: int) -> bool:
        return int(iid) in self.reasons

    def __len__(self) -> int:
        return len(self.reasons)

    def _append(self, reasons: dict[int, str]) -> None:
        if not reasons or self.path is None:
            return
        lines = "".join(f"{iid}\t{self.index.paths[iid] if self.index is not None else ''}\t"
                        f"{' '.join(reason.split())}\n" for iid, reason in reasons.items())
        new = not self.path.exists()
        with open(self.path, "a", encoding="utf-8", errors="surrogateescape") as f:
            f.write((self.HEADER if new else "") + lines)  # one write: a reader sees whole lines or none
        if self.path == self.list_path:
            self.listed.update(reasons)

    def record(self, reasons: dict[int, str], write: bool = True) -> None:
        """Ids known to be bad before any is read (files gone or replaced since the run started), without the
        console note (the caller says it once); written by one process only (`write`)."""
        new = {int(i): r for i, r in reasons.items() if int(i) not in self.reasons}
        self.reasons.update(new)
        if write:
            self._append(new)

    def add(self, iid: int, reason: str) -> None:
        iid = int(iid)
        if iid in self.reasons:
            return
        self._read_others()  # another rank may have named it
        if iid in self.reasons:
            return
        self.reasons[iid] = reason
        self.found_here += 1
        self._append({iid: reason})
        if self.found_here == 1 and self.announce:
            path = self.index.paths[iid] if self.index is not None else ""
            where = f"; list: {self.list_path}" if self.list_path is not None else ""
            warnings.warn(f"undecodable image (instance {iid}, {path or reason}): it and any others are replaced by "
                          f"the next decodable image of their epoch{where}", stacklevel=2)

    def total(self) -> int:
        """Bad files of the whole run: this process's and the other ranks' (read from their lists)."""
        return len({**self.read_all(), **self.reasons})

    def summary(self) -> str:
        total = self.total()
        if not total:
            return ""
        where = f" (listed in {self.list_path})" if self.list_path is not None else ""
        return f"{total} undecodable image(s) replaced by the next decodable image of their epoch{where}"


def _read_bad_list(path: Path) -> dict[int, str]:
    """id -> reason of a bad-file list or journal; only whole lines (another process may be appending)."""
    return _parse_bad_lines(path.read_bytes()) if path.is_file() else {}


def _parse_bad_lines(data: bytes) -> dict[int, str]:
    """id -> reason of the whole lines `id<TAB>path<TAB>reason` in `data` (the header and a malformed line are
    skipped)."""
    found = {}
    for line in data.decode("utf-8", errors="replace").split("\n")[:-1]:  # the last piece has no newline yet
        iid, _, rest = line.partition("\t")
        if iid.isdigit() and rest:
            found[int(iid)] = rest.partition("\t")[2]
    return found


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: a terminal's Ctrl-C or a scheduler's SIGTERM reaches the whole process group;
    the main process decides (it saves a checkpoint and shuts its workers down), the workers keep quiet. The cost:
    DataLoader's last-resort `terminate()` (SIGTERM) no longer ends a worker, nor does multiprocessing's exit
    handler, which terminates and then joins every worker still alive: a process whose workers were not shut down
    would wait for them forever. So whoever iterates such a DataLoader shuts it down with `shutdown_workers`
    on every exit path (the loaders' `close()`, `worker_batches`)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def shutdown_workers(iterator) -> None:
    """End the worker processes of a DataLoader iterator now, whatever state they are in: DataLoader's own
    shutdown (what it does when the iterator is collected: the workers finish their item and exit), then SIGKILL
    for a worker still alive after it (stuck in a read; it ignores SIGTERM). A no-op for a single-process
    iterator or one already shut down."""
    workers = list(getattr(iterator, "_workers", ()))
    if not workers:
        return
    iterator._shutdown_workers()
    for w in workers:
        if w.is_alive():
            w.kill()
            w.join(timeout=5)


def worker_batches(loader: torch.utils.data.DataLoader):
    """The batches of a non-persistent DataLoader, its workers shut down however the iteration ends (an
    exception in a worker, in the consumer, or a consumer that stops early)."""
    it = iter(loader)
    try:
        yield from it
    finally:
        shutdown_workers(it)


def substitutes(order: np.ndarray, position: int):
    """Candidates for position `position` of a unit's order: itself, then the images after it, cyclically.

    The policy of every backend for an undecodable image: it is replaced, id and pixels together, by the next
    image of the same unit that decodes. Batches keep exactly B samples (static shapes for the CUDA step and for
    DDP's collectives), a unit keeps its planned number of batches, the bank never trains a row on pixels that are
    not its image, and the choice is a pure function of the order (resume stays exact). The augmentation
    randomness stays that of the position. Under torchrun `order` is the rank's part of the unit (its slices of
    the global batches): the substitute is one of the rank's own images, so after a move to another world size the
    substitutes, and only they, may differ.
    """
    n = len(order)
    for j in range(n):
        yield int(order[(position + j) % n])


def first_good(order: np.ndarray, position: int, bad: BadFiles, try_decode):
    """`try_decode(iid) -> value or raises (CorruptImageError, FileNotFoundError, ...)`; walks `substitutes` past
    known-bad ids, records new ones in `bad`, returns (iid, value) of the first that decodes."""
    for iid in substitutes(order, position):
        if iid in bad:
            continue
        try:
            return iid, try_decode(iid)
        except DECODE_ERRORS as e:
            bad.add(iid, str(e))
    raise DataError(f"no decodable image: none of the {len(order)} images of this unit decodes (each is named in the "
                    f"bad-file list)")


def unit_size(schedule) -> int:
    """Ids per unit of a schedule, without computing a unit's order (O(N) for an epoch)."""
    size = getattr(schedule, "unit_size", None)
    return int(size) if size is not None else len(schedule.order(0))


class LoaderBase:
    """What the five backends share: the constructor's fields, the unit length, the bad-file record.

    The contract (the training loop checks it): `iter_epoch(unit, start_batch)` yields exactly
    `len(self) - start_batch` batches, each of exactly `batch_size` samples, whatever the data holds; an
    undecodable image is replaced by `substitutes`' rule and recorded in `bad_files`. Under torchrun the schedule
    is a `RankSchedule`: batch k is this rank's `rows` of global batch k, and the augmentation of every sample is
    drawn for its place in the global batch (`pipeline.augment.rand_rows`, `BatchRows.global_position`).
    """

    name = "?"

    def __init__(self, cfg, index, schedule, device: torch.device, batch_size: int,
                 bad_files: BadFiles | None = None):
        self.cfg = cfg
        self.index = index
        self.num_instances = len(index)
        self.schedule = schedule
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.seed = cfg.run.seed
        self.rows = batch_rows(schedule, batch_size)  # this rank's rows of every global batch
        self.bad_files = bad_files if bad_files is not None else BadFiles(index=index)

    def __len__(self) -> int:
        """Batches per unit (epoch or window): drop-last of the unit's order."""
        return unit_size(self.schedule) // self.batch_size

    def close(self) -> None:
        """Stop the loader's worker processes (train.py calls it on every exit path): those of its persistent
        DataLoader (`self.loader`: the torch and torch-gpu backends; none before the first unit). FFCV's thread
        ends with its unit's iterator, DALI's threads with the process."""
        shutdown_workers(getattr(getattr(self, "loader", None), "_iterator", None))

    @property
    def corrupt(self) -> dict[int, str]:
        """id -> reason of every undecodable image seen (or read back from the run folder)."""
        return self.bad_files.reasons


class ScheduleBatchSampler(torch.utils.data.Sampler):
    """Yields lists of (epoch, position, id) keys for one epoch/window of the schedule, drop_last."""

    def __init__(self, schedule, batch_size: int):
        self.schedule = schedule
        self.batch_size = batch_size
        self.epoch = 0
        self.start_batch = 0

    def set(self, epoch: int, start_batch: int) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return unit_size(self.schedule) // self.batch_size - self.start_batch

    def __iter__(self):
        order = np.asarray(self.schedule.order(self.epoch), dtype=np.int64)
        b = self.batch_size
        for k in range(self.start_batch, len(order) // b):
            yield [(self.epoch, k * b + j, int(order[k * b + j])) for j in range(b)]
