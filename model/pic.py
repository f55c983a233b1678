"""PIC = backbone -> MLP head -> (normalised) 128-d feature -> instance bank (cosine classifier over N rows).

`forward(images, ids, step, crops)` returns `(logits, targets)`, MoCo-builder style, so the training loop only
applies cross-entropy; after backward, `bank.step(lr, step)` updates the sampled rows.

The encoder part (backbone + head over every crop group) is its own module, `Encoder`, so that it alone is wrapped
by DDP and torch.compile: one encoder call per step, whatever the number of crop groups, and the bank (data-dependent
candidate sets, row-sparse updates) stays outside both.
"""

from __future__ import annotations

import torch
from torch import nn

from model.backbone import make_backbone
from model.classifier import InstanceBank
from model.head import make_head


class Encoder(nn.Module):
    """Crop groups (each [B,3,h,w]) -> head outputs (each [B,D]).

    BN statistics come from each crop group separately (spec §2), and with `bn_groups = g` from each of g equal
    chunks of a group ("ghost BN"): one process with batch B and g = 4 normalises like 4 GPUs with B/4 each, the
    paper's per-GPU BN (spec §13.7).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, bn_groups: int = 1):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.bn_groups = bn_groups

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn_groups > 1 and self.training:
            return torch.cat([self.head(self.backbone(c)) for c in x.chunk(self.bn_groups)])
        return self.head(self.backbone(x))

    def forward(self, views: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return tuple(self.embed(v) for v in views)


class PIC(nn.Module):
    def __init__(self, backbone: nn.Module, feat_dim: int, head: nn.Module, bank: InstanceBank, bn_groups: int = 1):
        super().__init__()
        self.backbone = backbone
        self.feat_dim = feat_dim
        self.head = head
        self.bank = bank
        # not registered as a submodule: it shares backbone/head, and state_dict keys stay backbone.* / head.*
        object.__setattr__(self, "encoder", Encoder(backbone, head, bn_groups))

    def train(self, mode: bool = True) -> PIC:
        super().train(mode)
        self.encoder.training = mode
        return self

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """images [B,3,H,W] -> head output [B,D] (not yet normalised; the bank normalises in fp32)."""
        return self.head(self.backbone(x))

    def forward(self, images: torch.Tensor, ids: torch.Tensor, step: int, crops: tuple[torch.Tensor, ...] = (),
                encoder: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`encoder`: the (DDP-wrapped / compiled) encoder to use instead of the plain one."""
        # `is None`, not `or`: a compiled module defines __len__ (torch >= 2.9), so its truth value is an error
        z = (self.encoder if encoder is None else encoder)((images, *crops))
        return self.bank(z[0], ids, step, tuple(z[1:]))


def build_pic(arch: str, num_instances: int, *, head_hidden: int = 2048, dim: int = 128, temperature: float = 0.2,
              init_std: float = 0.01, momentum: float = 0.9, weight_decay: float = 1e-4, negatives: str = "full",
              k: int = 65536, batch_size: int = 256, correction: str = "exact", lr_history=None,
              seed: int = 0, bn_groups: int = 1) -> PIC:
    torch.manual_seed(seed)
    backbone, feat_dim = make_backbone(arch)
    head = make_head(feat_dim, head_hidden, dim)
    g = torch.Generator().manual_seed(seed + 1)
    bank = InstanceBank(num_instances, dim, temperature, init_std, momentum, weight_decay, negatives, k,
                        batch_size, correction, lr_history, generator=g)
    return PIC(backbone, feat_dim, head, bank, bn_groups)
