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
    """The run's record of undecodable files: instance id -> reason, each named once per run.

    With a path (the run folder's `bad_files.tsv`; rank r > 0 of a torchrun writes `bad_files.rank<r>.tsv`, so no
    two processes append to one file), every new bad file is appended as a line `instance_id<TAB>path<TAB>reason`
    (flushed at once), and all of the run's lists are read back when it resumes, so a resumed run neither decodes
    nor names them again. Every rank visits every id over a run (its slices of the global orders), so before naming
    a new one a rank reads what the others appended since it last looked: a file another rank named is not named
    again. The console gets one note at the first bad file of a process and a summary line at the end (`summary()`),
    not a warning per file per epoch.
    """

    HEADER = "instance_id\tpath\treason\n"

    def __init__(self, path: str | os.PathLike | None = None, index=None, announce: bool = True, rank: int = 0):
        self.path = Path(path) if path else None
        if self.path is not None and rank:
            self.path = self.path.with_name(f"{self.path.stem}.rank{rank}{self.path.suffix}")
        self.index = index
        self.announce = announce  # False in worker processes: the main process names what they report
        self.reasons: dict[int, str] = {}
        self.found_here = 0  # found by this process (not read back from an earlier run)
        self._read_to: dict[Path, int] = {}  # list -> bytes of it already read (`_read_appended`)
        self.reasons.update(self.read_all())
        self._read_appended()

    def _lists(self) -> list[Path]:
        base = self.path.name.split(".")[0]
        return sorted(self.path.parent.glob(f"{base}*.tsv"))

    @staticmethod
    def _parse(text: str, into: dict[int, str]) -> None:
        """Lines `id<TAB>path<TAB>reason`; a malformed line (a kill mid-write) is skipped."""
        for line in text.splitlines():
            iid, _, rest = line.partition("\t")
            if iid.isdigit() and rest:
                into[int(iid)] = rest.partition("\t")[2]

    def read_all(self) -> dict[int, str]:
        """Every list of this run folder (all ranks, earlier runs)."""
        found: dict[int, str] = {}
        if self.path is None:
            return found
        for f in self._lists():
            self._parse(f.read_text(encoding="utf-8", errors="replace"), found)
        return found

    def _read_appended(self) -> None:
        """Add what the other ranks' lists gained since the last look (whole lines only: one may be mid-write)."""
        if self.path is None:
            return
        for f in self._lists():
            if f == self.path:
                continue
            with open(f, "rb") as fh:
                fh.seek(self._read_to.get(f, 0))
                chunk = fh.read()
            whole = chunk[:chunk.rfind(b"\n") + 1]
            self._read_to[f] = self._read_to.get(f, 0) + len(whole)
            self._parse(whole.decode("utf-8", errors="replace"), self.reasons)

    def __contains__(self, iid: int) -> bool:
        return int(iid) in self.reasons

    def __len__(self) -> int:
        return len(self.reasons)

    def add(self, iid: int, reason: str) -> None:
        iid = int(iid)
        if iid in self.reasons:
            return
        self._read_appended()  # another rank may have named it (rare: a new bad file, so one small read)
        if iid in self.reasons:
            return
        self.reasons[iid] = reason
        self.found_here += 1
        path = self.index.paths[iid] if self.index is not None else ""
        if self.path is not None:
            new = not self.path.exists()
            with open(self.path, "a", encoding="utf-8") as f:
                f.write((self.HEADER if new else "") + f"{iid}\t{path}\t{' '.join(reason.split())}\n")
        if self.found_here == 1 and self.announce:
            where = f"; list: {self.path}" if self.path is not None else ""
            warnings.warn(f"undecodable image (instance {iid}, {path or reason}): it and any others are replaced by "
                          f"the next decodable image of their epoch{where}", stacklevel=2)

    def total(self) -> int:
        """Bad files of the whole run: this process's and the other ranks' (read from their lists)."""
        return len({**self.read_all(), **self.reasons})

    def summary(self) -> str:
        total = self.total()
        if not total:
            return ""
        where = f" (listed in {self.path.parent / 'bad_files*.tsv'})" if self.path is not None else ""
        return f"{total} undecodable image(s) replaced by the next decodable image of their epoch{where}"


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: a terminal's Ctrl-C or a scheduler's SIGTERM reaches the whole process group;
    the main process decides (it saves a checkpoint and shuts its workers down), the workers keep quiet. The cost:
    DataLoader's last-resort `terminate()` of a worker stuck for 5 s at shutdown no longer kills it; such a worker
    exits when its read returns (its watchdog sees the parent gone)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


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
    raise DataError(f"no image of this unit of {len(order)} images decodes (see the bad-file list)")


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
