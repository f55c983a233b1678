"""The bank's options (the pic.* keys of config.py, with the SGD's momentum and weight decay, D and the global batch)
and the combinations refused before any work, each in one line. docs/bank.md has them as a table."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch

from config import Config, ConfigError
from model import distributed as dist
from model.bank.rows import DTYPES, dtype_name
from model.checkpoint import CheckpointError

STORAGES = ("device", "host", "mmap")


@dataclass(frozen=True)
class BankOptions:
    dim: int = 128
    temperature: float = 0.2
    init_std: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    negatives: str = "full"  # full | recent
    k: int = 65536
    batch_size: int = 256  # the global batch
    correction: str = "exact"  # exact | const | none
    storage: str = "device"  # device | host | mmap
    dtype: str = "fp32"  # fp32 | bf16 | fp16 (fp64: the oracle tests)
    folder: str = ""  # pic.bank_file
    cache: str = "auto"  # auto | on | off
    placement: str = "auto"  # pic.bank_device: auto (the training device) | cpu (host memory)

    def __post_init__(self):
        if self.k < 1:
            raise ConfigError(f"pic.k={self.k}: the number of recent negatives must be at least 1")
        if self.storage not in STORAGES or self.dtype not in DTYPES:
            raise ConfigError(f"pic.bank_storage={self.storage}, pic.bank_dtype={self.dtype}: storage one of "
                              f"{', '.join(STORAGES)}, dtype one of {', '.join(DTYPES)}")
        if self.folder and self.storage == "device":
            # a device bank is tensors of each process: the folder would silently stay unused
            raise ConfigError(f"pic.bank_file={self.folder} is read by pic.bank_storage=mmap or host only; with "
                              f"pic.bank_storage=device it does nothing: set pic.bank_storage=mmap, or drop "
                              f"pic.bank_file")
        if self.cache == "on" and self.negatives != "recent":
            raise ConfigError("pic.bank_cache=on keeps the recent-negative ring's rows: it needs pic.negatives=recent "
                              "(the full soft-max reads every row each step)")
        if self.storage == "mmap" and not self.folder:
            raise ConfigError("pic.bank_storage=mmap needs pic.bank_file (a folder on a disk with room for the bank)")
        if self.folder and Path(self.folder).exists() and not Path(self.folder).is_dir():
            raise ConfigError(f"pic.bank_file={self.folder} is a file, not a folder: a bank is a folder of files "
                              f"(meta.json, weight.bin, ...); give the path of a folder (it is created when missing)")

    @classmethod
    def from_config(cls, cfg: Config) -> BankOptions:
        p = cfg.pic
        return cls(dim=cfg.model.dim, temperature=p.temperature, init_std=p.init_std, momentum=cfg.optim.momentum,
                   weight_decay=cfg.optim.weight_decay, negatives=p.negatives, k=p.k, batch_size=cfg.data.batch_size,
                   correction=p.correction, storage=p.bank_storage, dtype=p.bank_dtype, folder=p.bank_file,
                   cache=p.bank_cache, placement=p.bank_device)

    def replace(self, **changes) -> BankOptions:
        return BankOptions(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})

    def cache_on(self, device: torch.device) -> bool:
        """pic.bank_cache (with sampled negatives): auto keeps the ring's rows on the training device where the bank
        is far from it (shared memory, a disk file, or host memory under a GPU); on a device bank the K+B gather is
        one on-device copy anyway."""
        if self.cache != "auto":
            return self.cache == "on"
        return self.storage != "device" or (self.placement == "cpu" and torch.device(device).type == "cuda")


def saved_kind_and_dtype(state: dict) -> tuple[str, str]:
    """A checkpoint's bank: ("tensors" or "file", its dtype name)."""
    rows = state["rows"]
    if rows.get("kind") == "file":
        return "file", rows["dtype"]
    return "tensors", dtype_name(rows["weight"].dtype)


def check_resumable(state: dict, options: BankOptions, source: str) -> None:
    """A bank is resumed with its dtype, and an mmap bank from its file only (device and host banks are saved
    alike, as tensors). Checked before any bank file is made or opened."""
    kind, dtype = saved_kind_and_dtype(state)
    if dtype != options.dtype:
        raise CheckpointError(f"{source} holds a {dtype} bank; this run asks pic.bank_dtype={options.dtype}")
    if (kind == "file") != (options.storage == "mmap"):
        saved = "mmap" if kind == "file" else "device or host"
        raise CheckpointError(f"{source} holds a pic.bank_storage={saved} bank; this run asks {options.storage} (an "
                              f"mmap bank is resumed from its file only)")
    rows = state["rows"]
    if kind == "file" and "nodes" in rows:  # one copy per node (node<i>/ beside each other when several)
        nodes = dist.world() // dist.local_group()[2]
        if rows["nodes"] != nodes:
            raise CheckpointError(f"{source} has an mmap bank with one copy per node on {rows['nodes']} node(s) "
                                  f"({rows.get('path')}); this run has {nodes}: an mmap bank resumes on as many nodes "
                                  f"(world size / LOCAL_WORLD_SIZE) as wrote it, with any number of ranks per node. "
                                  f"Device and host banks (their rows are in the checkpoint) resume on any")
