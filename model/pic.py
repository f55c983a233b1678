"""PIC = backbone -> MLP head -> (normalised) 128-d feature -> instance bank (cosine classifier over N rows).

`forward(images, ids, step, crops)` returns `(logits, targets)`, MoCo-builder style, so the training loop only
applies cross-entropy; after backward, `bank.step(lr, step)` updates the sampled rows.
"""

from __future__ import annotations

import torch
from torch import nn

from model.backbone import make_backbone
from model.classifier import InstanceBank
from model.head import make_head


class PIC(nn.Module):
    def __init__(self, backbone: nn.Module, feat_dim: int, head: nn.Module, bank: InstanceBank):
        super().__init__()
        self.backbone = backbone
        self.feat_dim = feat_dim
        self.head = head
        self.bank = bank

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """images [B,3,H,W] -> head output [B,D] (not yet normalised; the bank normalises in fp32)."""
        return self.head(self.backbone(x))

    def forward(self, images: torch.Tensor, ids: torch.Tensor, step: int,
                crops: tuple[torch.Tensor, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        # One encoder pass per crop group, so BN statistics come from each group separately (spec §2).
        z = self.embed(images)
        z_small = tuple(self.embed(c) for c in crops)
        return self.bank(z, ids, step, z_small)


def build_pic(arch: str, num_instances: int, *, head_hidden: int = 2048, dim: int = 128, temperature: float = 0.2,
              init_std: float = 0.01, momentum: float = 0.9, weight_decay: float = 1e-4, negatives: str = "full",
              k: int = 65536, batch_size: int = 256, correction: str = "exact", lr_history=None,
              seed: int = 0) -> PIC:
    torch.manual_seed(seed)
    backbone, feat_dim = make_backbone(arch)
    head = make_head(feat_dim, head_hidden, dim)
    g = torch.Generator().manual_seed(seed + 1)
    bank = InstanceBank(num_instances, dim, temperature, init_std, momentum, weight_decay, negatives, k,
                        batch_size, correction, lr_history, generator=g)
    return PIC(backbone, feat_dim, head, bank)
