"""One place that assembles what trains: the PIC model, its instance bank, its optimizer, the training step and the
lr table.

`build_trainer(cfg, num_instances, device)` is used by train.py, the benchmarks and the tests, so a model, a bank,
an optimizer and a step are built the same way everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from config import Config
from model import distributed as dist
from model.bank import BankOptions, make_bank, saved_state
from model.optim import lr_table, make_optimizer
from model.pic import PIC, build_pic
from model.step import TrainStep
from plan import Resolved, resolve


@dataclass
class Trainer:
    model: PIC  # its bank: model.bank
    optimizer: torch.optim.Optimizer
    train_step: TrainStep  # one training step (the global step count is the loop's `step`)
    lrs: np.ndarray  # float64 [total_steps + 1]: the lr of every step (the bank's correction replays it)

    def close(self) -> None:
        """Release the bank (a host bank's shared-memory files are removed: the checkpoints hold its rows)."""
        self.model.bank.close()


def build_trainer(cfg: Config, num_instances: int, device: torch.device, lrs: np.ndarray | None = None,
                  fused: bool | None = None, plan: Resolved | None = None, *, run_dir: Path | None = None,
                  checkpoint: tuple[dict, Path] | None = None, continuing: bool = False,
                  **step_options) -> Trainer:
    """The model on `device`, its bank (model/bank: make_bank places it), SGD on backbone + head, and the step.
    `lrs`: the lr table; default the run's schedule (`plan`, the run's `plan.resolve`, computed when not given).
    run_dir: the run folder (the bank's owner); checkpoint: (a loaded checkpoint, its path) to resume from, restored
    into the model, the bank and the optimizer; continuing: the run asked to resume but found no checkpoint.
    `step_options`: TrainStep keywords (e.g. sync_free, grad_scaler) and `fused` (the fused SGD kernel; default: on
    CUDA) for tests and benchmarks.

    Changes the model before wrapping it, and says so: with `model.sync_bn` under torchrun the backbone's BN layers
    become SyncBatchNorm; with `model.channels_last` its weights take that memory format."""
    m, o = cfg.model, cfg.optim
    res = plan if plan is not None else resolve(cfg, num_instances, dist.world())
    if lrs is None:
        lrs = lr_table(res.lr, res.warmup_steps, res.total_steps, o.min_lr)
    model = build_pic(m.arch, head_hidden=m.head_hidden, dim=m.dim, seed=cfg.run.seed, bn_groups=m.bn_groups)
    ckpt, path = checkpoint if checkpoint is not None else (None, None)
    model.bank = make_bank(BankOptions.from_config(cfg), num_instances, lrs, device,
                           generator=torch.Generator().manual_seed(cfg.run.seed + 1), owner=run_dir,
                           resume=saved_state(ckpt) if ckpt is not None else None, resume_source=str(path),
                           continuing=continuing)
    try:
        optimizer, step = _wrap(cfg, model, device, res.lr, fused, step_options)
        if ckpt is not None:
            model.load_state_dict({k: v for k, v in ckpt["model"].items() if not k.startswith("bank.")})
            optimizer.load_state_dict(ckpt["optimizer"])
            if not step.load_scaler_state(ckpt.get("scaler")) and dist.rank() == 0:
                print(f"note: {path} holds no loss-scale state (trained without model.amp=fp16, or by an older "
                      f"version): the fp16 loss scaler starts at its initial scale", flush=True)
    except BaseException:
        model.bank.close()  # a host bank's shared memory is not left behind
        raise
    return Trainer(model, optimizer, step, lrs)


def _wrap(cfg: Config, model: PIC, device: torch.device, lr: float, fused: bool | None,
          step_options: dict) -> tuple[torch.optim.Optimizer, TrainStep]:
    """The model on `device` in its memory format, SGD on backbone + head, and the step around them."""
    m, o = cfg.model, cfg.optim
    model.to(device)
    if m.sync_bn and dist.active():
        model.backbone = nn.SyncBatchNorm.convert_sync_batchnorm(model.backbone)
    if m.channels_last:  # also on CPU, where it helps convolutions too
        model.backbone.to(memory_format=torch.channels_last)
    params = list(model.backbone.parameters()) + list(model.head.parameters())
    optimizer = make_optimizer(params, lr, o.momentum, o.weight_decay, device, fused=fused)
    return optimizer, TrainStep(model, optimizer, device, m.amp, m.channels_last, m.compile, **step_options)
