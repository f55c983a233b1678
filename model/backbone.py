"""Backbones: torchvision ResNets by name (docs/method.md §1 init) and a tiny CNN for CPU demos and tests.

`make_backbone(name) -> (module, feat_dim)`: the module maps images [B,3,H,W] to pooled features [B,feat_dim].
ResNets keep torchvision's module names with `fc = Identity`, so an exported state dict loads into
`torchvision.models.<arch>()` with only `fc.*` missing.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision import models

RESNETS = {"resnet18": (models.resnet18, 512), "resnet34": (models.resnet34, 512), "resnet50": (models.resnet50, 2048)}


class TinyCNN(nn.Module):
    """Four conv-BN-ReLU blocks (32-64-128-256 channels, three stride-2) and global average pooling.

    About 15 MFLOPs per 32-px image: fast enough on two CPU cores for hundreds of PIC epochs on a small set.
    """

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 256)):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i, c in enumerate(widths):
            layers += [nn.Conv2d(c_in, c, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                       nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = c_in
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


def make_backbone(name: str) -> tuple[nn.Module, int]:
    if name == "tiny":
        m = TinyCNN()
        return m, m.out_dim
    if name not in RESNETS:
        raise ValueError(f"unknown backbone {name!r}; available: tiny, {', '.join(RESNETS)}")
    ctor, dim = RESNETS[name]
    # torchvision's init is docs/method.md §1's: conv ~ kaiming normal (fan_out), BN gamma 1 / beta 0;
    # zero_init_residual sets the last BN gamma of every residual block to 0.
    m = ctor(weights=None, zero_init_residual=True)
    m.fc = nn.Identity()
    return m, dim
