"""PIC = backbone -> MLP head -> (normalised) 128-d feature -> instance bank (cosine classifier over N rows).

`PIC` holds the parts (state_dict keys backbone.* and head.*; the bank, model/bank/, checkpoints itself) and
computes `forward(images, ids, step, crops) -> (logits, targets, update)` unwrapped, for evaluation and tests.
Training runs through `model.step.TrainStep`, which owns the order of a step: the `Encoder` (backbone + head over
every crop group, one call: what DDP and torch.compile wrap) under autocast, then the bank in fp32 (data-dependent
candidate sets and row-sparse updates stay outside both), then the updates.
"""

from __future__ import annotations

import torch
from torch import nn

from model.backbone import make_backbone
from model.bank import Forward, InstanceBank
from model.head import make_head


def embed(backbone: nn.Module, head: nn.Module, x: torch.Tensor, bn_groups: int = 1) -> torch.Tensor:
    """images [B,3,H,W] -> head output [B,D] (not yet normalised; the bank normalises in fp32).

    In training, with `bn_groups = g`, BN statistics come from each of g equal chunks ("ghost BN"): one process
    with batch B and g = 4 normalises like 4 GPUs with B/4 each, the paper's per-GPU BN (docs/method.md §10 item 5)."""
    if bn_groups > 1 and backbone.training:
        return torch.cat([head(backbone(c)) for c in x.chunk(bn_groups)])
    return head(backbone(x))


class Encoder(nn.Module):
    """Crop groups (each [B,3,h,w]) -> head outputs (each [B,D]); BN statistics per crop group (docs/method.md §2).

    A module of its own over the PIC's backbone and head (the same parameters), so that it alone is wrapped by
    DDP and torch.compile."""

    def __init__(self, backbone: nn.Module, head: nn.Module, bn_groups: int = 1):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.bn_groups = bn_groups

    def forward(self, views: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return tuple(embed(self.backbone, self.head, v, self.bn_groups) for v in views)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return embed(self.backbone, self.head, x, self.bn_groups)


def build_encoder(arch: str, *, head_hidden: int = 2048, dim: int = 128, seed: int = 0,
                  bn_groups: int = 1) -> tuple[Encoder, int]:
    """(backbone + head initialised from `seed`, the backbone's feature width): a PIC without its bank (the
    end-of-run evaluation's random-init baseline; build_pic's own start)."""
    torch.manual_seed(seed)
    backbone, feat_dim = make_backbone(arch)
    return Encoder(backbone, make_head(feat_dim, head_hidden, dim), bn_groups), feat_dim


class PIC(nn.Module):
    def __init__(self, backbone: nn.Module, feat_dim: int, head: nn.Module, bank: InstanceBank | None = None,
                 bn_groups: int = 1):
        super().__init__()
        self.backbone = backbone
        self.feat_dim = feat_dim
        self.head = head
        self.bank = bank  # not a submodule: placed by make_bank, saved by its own checkpoint()
        self.bn_groups = bn_groups

    def encoder(self) -> Encoder:
        """A fresh Encoder over this model's backbone and head (what the training step wraps)."""
        return Encoder(self.backbone, self.head, self.bn_groups)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return embed(self.backbone, self.head, x, self.bn_groups)

    def forward(self, images: torch.Tensor, ids: torch.Tensor, step: int,
                crops: tuple[torch.Tensor, ...] = ()) -> Forward:
        z = [self.embed(v) for v in (images, *crops)]
        return self.bank(z[0], ids, step, tuple(z[1:]))


def build_pic(arch: str, bank: InstanceBank | None = None, *, head_hidden: int = 2048, dim: int = 128, seed: int = 0,
              bn_groups: int = 1) -> PIC:
    """Backbone and head initialised from `seed` (build_encoder), around `bank` (model/bank: make_bank; None for a
    model that only embeds)."""
    encoder, feat_dim = build_encoder(arch, head_hidden=head_hidden, dim=dim, seed=seed, bn_groups=bn_groups)
    return PIC(encoder.backbone, feat_dim, encoder.head, bank, bn_groups)
