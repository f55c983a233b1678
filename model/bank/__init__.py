"""The instance bank behind one door: `make_bank(options, num_instances, ...)` builds it with every rule.

    model/bank/options.py     BankOptions: the pic.* bank options, refused up front where they do not combine
    model/bank/classifier.py  InstanceBank: candidates, cosine logits, row SGD; forward returns the update's handle
    model/bank/rows.py        the Rows interface, and TensorRows (tensors of this process)
    model/bank/files.py       FileRows: one copy per node in /dev/shm (host) or on disk (mmap), lock, owner
    model/bank/journal.py     the undo journal that makes every write of an mmap bank undoable
    model/bank/ring_cache.py  RingCache: the recent-negative ring's rows on the compute device, over any Rows
    model/bank/negatives.py   the recent-negative FIFO and its K+B candidate slots
    model/bank/correction.py  the closed-form correction of stale rows, and its strategies (none, kernel, table)

What make_bank decides (docs/bank.md has the options as a table: what each combination does, or refuses):
  * placement: the rows on the training device, or host memory (pic.bank_device=cpu), or in files (host, mmap);
  * the correction: none for the full soft-max (no row is ever stale) or pic.correction=none; else the device
    table where rows are corrected on CUDA (the ring cache's rows: the training device), the numba/torch kernel
    elsewhere;
  * the ring cache: on for host and mmap banks and for a host-memory bank under a GPU (pic.bank_cache=auto), only
    with sampled negatives (K < N);
  * a run's bank files: the default /dev/shm folder of a host bank (removed when the bank closes), an mmap folder's
    owner (a folder found without a checkpoint is this run's, killed before its first checkpoint and rolled back,
    or refused naming its owner), and the resume: a checkpoint's bank is restored before the bank is used, after
    its storage and dtype were checked against the options (before any file is made).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from model.bank.classifier import NORM_EPS, Forward, InstanceBank, RowUpdate
from model.bank.correction import make_correction
from model.bank.files import BankFileError, FileRows, adopt, default_host_dir
from model.bank.negatives import RecentNegatives, uses_full_softmax
from model.bank.options import BankOptions, check_resumable
from model.bank.ring_cache import WRITEBACK_LAG, RingCache
from model.bank.rows import DTYPES, BankError, Rows, TensorRows

__all__ = ["NORM_EPS", "BankError", "BankFileError", "BankOptions", "Forward", "InstanceBank", "Rows", "RowUpdate",
           "make_bank", "saved_state"]


def make_bank(options: BankOptions, num_instances: int, lr_history: np.ndarray | None = None,
              device: torch.device | str = "cpu", *, generator: torch.Generator | None = None,
              owner: str | Path | None = None, resume: dict | None = None, resume_source: str = "the checkpoint",
              continuing: bool = False, correction_form: str = "auto", writeback_lag: int = WRITEBACK_LAG,
              tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> InstanceBank:
    """The bank of `num_instances` rows for training on `device`.

    lr_history: the lr of every step (the correction replays it; None: no correction). generator: W's initial rows.
    owner: the run folder (a host bank's default folder; an mmap bank's owner). resume: a checkpoint's bank state
    (`InstanceBank.checkpoint`), restored before the bank is returned; resume_source names it in errors.
    continuing: the run asked to continue (resume=auto) but found no checkpoint. correction_form: auto, kernel or
    table (the tests run the CUDA table on the CPU); writeback_lag: the ring cache's (tests). tensors: weight,
    momentum, last to use as the rows of a device bank instead of new ones (benchmarks share one table)."""
    device = torch.device(device)
    o = options
    if resume is not None:
        check_resumable(resume, o, resume_source)  # before any file is made
    sampled = o.negatives == "recent" and not uses_full_softmax(o.k, num_instances)
    negatives = RecentNegatives(o.k, o.batch_size) if sampled else None
    cached = sampled and o.cache_on(device)
    home = device if o.storage == "device" and o.placement == "auto" else torch.device("cpu")
    correction = make_correction(o.correction if sampled else "none", lr_history, o.momentum, o.weight_decay,
                                 home, "kernel" if cached else correction_form)
    if tensors is not None and o.storage == "device":
        rows = TensorRows(*tensors, correction)
    else:
        rows = _rows(o, num_instances, home, generator, correction, owner)
    if cached:
        rows = RingCache(rows, negatives, device, make_correction(o.correction, lr_history, o.momentum,
                                                                  o.weight_decay, device, correction_form),
                         writeback_lag)
    bank = InstanceBank(rows, o.temperature, o.momentum, o.weight_decay, negatives)
    try:
        files = rows.inner if cached else rows
        if resume is not None:
            bank.restore(resume)
        mmap = isinstance(files, FileRows) and files.journal is not None
        if mmap and owner is not None:
            if resume is None:
                adopt(files, str(Path(owner).resolve()), continuing)
            files.set_owner(str(Path(owner).resolve()))  # the file is this run's from now on
    except BaseException:
        bank.close()
        raise
    return bank


def _rows(o: BankOptions, n: int, home: torch.device, generator: torch.Generator | None, correction,
          owner: str | Path | None) -> Rows:
    dtype = DTYPES[o.dtype]
    if o.storage == "device":
        return TensorRows.initial(n, o.dim, dtype, o.init_std, generator, home, correction)
    folder = o.folder or (default_host_dir(owner) if owner is not None else "")
    if not folder:
        raise BankFileError(f"pic.bank_storage={o.storage} needs a folder (pic.bank_file)")
    try:
        rows = FileRows(o.storage, folder, n, o.dim, dtype, o.init_std, generator, correction)
    except OSError as e:  # the bank's folder cannot be made or mapped (no permission, a file on its path, ...)
        raise BankFileError(f"pic.bank_file={folder}: the bank cannot be made there ({e.strerror or e}: "
                            f"{e.filename})") from None
    rows.temporary = o.storage == "host"  # its rows are in the checkpoints: removed when the bank closes
    return rows


def saved_state(ckpt: dict) -> dict:
    """A checkpoint's bank state (`InstanceBank.checkpoint`). Checkpoints written before the bank saved itself kept
    its tensors among the model's (bank.weight, ...) and the FIFO, the file reference and the ring's rows beside:
    they are read as well."""
    bank = ckpt["bank"]
    if "rows" in bank:
        return bank
    if bank.get("storage"):
        rows = {"kind": "file", **bank["storage"]}
    else:
        rows = {"kind": "tensors", **{k: ckpt["model"][f"bank.{k}"] for k in ("weight", "momentum", "last")}}
    if bank.get("ring_rows") is not None:
        rows["ring_rows"] = {**bank["ring_rows"], "step": ckpt["progress"]["step"] - 1}
    return {"rows": rows, "negatives": bank.get("negatives")}
