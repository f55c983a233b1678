"""One place that assembles what trains: the PIC model, its optimizer, the training step and the lr table.

`build_trainer(cfg, num_instances, device)` is used by train.py, the benchmarks and the tests, so a model, an
optimizer and a step are built the same way everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from config import Config, ConfigError, Resolved, resolve
from model import distributed as dist
from model.bank_storage import BankFileError, default_host_dir
from model.optim import lr_table, make_optimizer
from model.pic import PIC, build_pic
from model.step import TrainStep


@dataclass
class Trainer:
    model: PIC
    optimizer: torch.optim.Optimizer
    step: TrainStep
    lrs: np.ndarray  # float64 [total_steps + 1]: the lr of every step (the bank's correction replays it)


def uses_bank_cache(cfg: Config, device: torch.device) -> bool:
    """pic.bank_cache: auto keeps the ring's rows on the device where the bank is far from it (shared memory, a
    disk file, or host memory under a GPU); on a device bank the K+B gather is one on-device copy anyway."""
    p = cfg.pic
    if p.bank_cache != "auto":
        return p.bank_cache == "on"
    return p.bank_storage != "device" or (p.bank_device == "cpu" and device.type == "cuda")


def build_trainer(cfg: Config, num_instances: int, device: torch.device, lrs: np.ndarray | None = None,
                  fused: bool | None = None, plan: Resolved | None = None, **step_options) -> Trainer:
    """The model on `device` (the bank on the host with `pic.bank_device=cpu`), SGD on backbone + head, and the
    step. `lrs`: the lr table; default the run's schedule (`plan`, the run's `config.resolve`, computed when not
    given). `step_options`: TrainStep keywords
    (e.g. sync_free, grad_scaler) and `fused` (the fused SGD kernel; default: on CUDA) for tests and
    benchmarks.

    Changes the model before wrapping it, and says so: with `model.sync_bn` under torchrun the backbone's BN layers
    become SyncBatchNorm; with `model.channels_last` its weights take that memory format."""
    m, p, o = cfg.model, cfg.pic, cfg.optim
    res = plan if plan is not None else resolve(cfg, num_instances, dist.world())
    if lrs is None:
        lrs = lr_table(res.lr, res.warmup_steps, res.total_steps, o.min_lr)
    host_dir = default_host_dir(Path(cfg.run.out_dir) / cfg.run.name) if p.bank_storage == "host" else ""
    bank_file = p.bank_file or host_dir
    if p.bank_storage == "mmap" and not bank_file:
        raise ConfigError("pic.bank_storage=mmap needs pic.bank_file (a folder on a disk with room for the bank)")
    if bank_file and Path(bank_file).exists() and not Path(bank_file).is_dir():
        raise ConfigError(f"pic.bank_file={bank_file} is a file, not a folder: a bank is a folder of files (meta.json, "
                          f"weight.bin, ...); give the path of a folder (it is created when missing)")
    try:
        model = build_pic(m.arch, num_instances, head_hidden=m.head_hidden, dim=m.dim, temperature=p.temperature,
                          init_std=p.init_std, momentum=o.momentum, weight_decay=o.weight_decay, negatives=p.negatives,
                          k=p.k, batch_size=cfg.data.batch_size, correction=p.correction, lr_history=lrs,
                          seed=cfg.run.seed, bn_groups=m.bn_groups, bank_storage=p.bank_storage,
                          bank_dtype=p.bank_dtype, bank_file=bank_file, bank_cache=uses_bank_cache(cfg, device))
    except OSError as e:  # the bank's folder cannot be made or mapped (no permission, a file on its path, ...)
        if not bank_file:
            raise
        raise BankFileError(f"pic.bank_file={bank_file}: the bank cannot be made there ({e.strerror or e}: "
                            f"{e.filename})") from None
    model.to(device)
    if p.bank_device == "cpu" and device.type == "cuda":
        model.bank.to("cpu")
    if m.sync_bn and dist.active():
        model.backbone = nn.SyncBatchNorm.convert_sync_batchnorm(model.backbone)
    if m.channels_last:  # also on CPU, where it helps convolutions too
        model.backbone.to(memory_format=torch.channels_last)
    params = list(model.backbone.parameters()) + list(model.head.parameters())
    optimizer = make_optimizer(params, res.lr, o.momentum, o.weight_decay, device, fused=fused)
    step = TrainStep(model, optimizer, device, m.amp, m.channels_last, m.compile, **step_options)
    return Trainer(model, optimizer, step, lrs)
