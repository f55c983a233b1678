"""The PIC projection head (docs/method.md §1): Linear(d, hidden) -> ReLU -> Linear(hidden, dim), no BN, default
init."""

from __future__ import annotations

from torch import nn


def make_head(in_dim: int, hidden: int = 2048, dim: int = 128) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))
