"""The backbone's optimizer and the learning-rate schedule (docs/method.md §6), shared by training, evaluation and
benchmarks.

The bank keeps its own row-sparse SGD (model/bank/classifier.py) with the same lr, momentum and weight decay; its lazy
correction needs the lr of every past step, hence `lr_table`.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def make_optimizer(params, lr: float, momentum: float, weight_decay: float, device: torch.device,
                   fused: bool | None = None):
    # wd on every parameter, BN and biases included (docs/method.md §1, §6).
    # fused=True: one kernel for all params (CUDA).
    fused = device.type == "cuda" if fused is None else fused
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=fused or None)


def lr_at(step: int, base: float, warmup_steps: int, total_steps: int, min_lr: float = 1e-6) -> float:
    """Linear warm-up from base/100 to base over `warmup_steps`, then cosine from base to `min_lr` at `total_steps`."""
    if warmup_steps > 0 and step <= warmup_steps:
        return base / 100 * (99 * step / warmup_steps + 1)
    t = max(total_steps - warmup_steps, 1)
    return min_lr + (base - min_lr) * (1 + math.cos(math.pi * min(step - warmup_steps, t) / t)) / 2


def lr_table(base: float, warmup_steps: int, total_steps: int, min_lr: float) -> np.ndarray:
    """lr of every step 0..total_steps (float64): the bank's weight correction needs the whole history."""
    return np.array([lr_at(i, base, warmup_steps, total_steps, min_lr) for i in range(total_steps + 1)])
