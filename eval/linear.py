"""Linear probe (spec §8): a new fc on frozen backbone features.

    python -m eval.linear --ckpt runs/NAME/last.pt --train DIR --val DIR [--epochs 100] [--cached]

Protocol of the PIC code: SGD lr 30 (not batch-scaled), momentum 0.9, wd 0, batch 256, 100 epochs, 5 warm-up
epochs from lr/100 then cosine; train augmentation RandomResizedCrop(0.08, 1) + flip; val resize + centre crop.
Its quirk is kept by default: the frozen backbone stays in train mode, so BN uses batch statistics (and updates
its running stats); `--bn=eval` gives MoCo's protocol. `--cached` extracts centre-crop features once and trains
the fc on them (no augmentation, BN in eval mode): minutes instead of hours on a CPU.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from eval.common import add_model_args, load_backbone_fn
from eval.features import EvalImages, _collate, extract
from pipeline.augment import view_transform
from pipeline.dataset import load_index
from train import lr_at


def train_linear(fc: nn.Linear, batches, epochs: int, lr: float, features_fn=None) -> None:
    """batches(): an iterable of (x, y) per epoch; features_fn maps x to features (None: x are features)."""
    opt = torch.optim.SGD(fc.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    steps_per_epoch = max(1, len(batches()))
    total, warmup = epochs * steps_per_epoch, min(5, epochs // 10) * steps_per_epoch
    step = 0
    for _ in range(epochs):
        for x, y in batches():
            for g in opt.param_groups:
                g["lr"] = lr_at(step, lr, warmup, total, 0.0)
            with torch.no_grad():
                f = features_fn(x) if features_fn is not None else x
            loss = F.cross_entropy(fc(f), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1


@torch.no_grad()
def accuracy(fc: nn.Linear, feats: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    logits = fc(feats)
    top5 = logits.topk(min(5, logits.shape[1]), 1).indices
    return (100 * (top5[:, 0] == labels).float().mean().item(),
            100 * (top5 == labels[:, None]).any(1).float().mean().item())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="linear probe on a frozen PIC backbone (spec §8)")
    add_model_args(ap)
    ap.add_argument("--train", required=True)
    ap.add_argument("--val", required=True)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--lr", type=float, default=30.0)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--bn", choices=("train", "eval"), default="train")
    ap.add_argument("--cached", action="store_true")
    args = ap.parse_args(argv)
    backbone, size, device = load_backbone_fn(args)
    train_index, val_index = load_index(args.train), load_index(args.val)
    num_classes = int(max(train_index.labels.max(), val_index.labels.max())) + 1
    fva, yva, _ = extract(backbone, val_index, size, device, workers=args.workers)
    fc = nn.Linear(fva.shape[1], num_classes).to(device)
    fc.weight.data.normal_(0, 0.01)
    fc.bias.data.zero_()
    if args.cached:
        ftr, ytr, _ = extract(backbone, train_index, size, device, workers=args.workers)
        dl = DataLoader(TensorDataset(ftr.to(device), ytr.to(device)), batch_size=args.batch_size, shuffle=True)
        train_linear(fc, lambda: dl, args.epochs, args.lr)
    else:
        if args.bn == "train":
            backbone.train()
        tf = view_transform_no_color(size)
        dl = DataLoader(EvalImages(train_index, tf), batch_size=args.batch_size, shuffle=True, drop_last=False,
                        num_workers=args.workers, collate_fn=_collate)

        batches = _Batches(dl, device)
        train_linear(fc, lambda: batches, args.epochs, args.lr, features_fn=backbone)
        backbone.eval()
    top1, top5 = accuracy(fc.cpu(), fva, yva)
    print(f"linear probe: top-1 {top1:.2f}  top-5 {top5:.2f}  ({args.epochs} epochs, "
          f"{'cached features' if args.cached else 'augmented, BN ' + args.bn})")
    return 0


class _Batches:
    """Re-iterable view of a DataLoader yielding (x, y) on the device, skipping empty (all-corrupt) batches."""

    def __init__(self, dl, device):
        self.dl, self.device = dl, device

    def __len__(self) -> int:
        return len(self.dl)

    def __iter__(self):
        for b in self.dl:
            if b is not None:
                yield b[0].to(self.device), b[1].to(self.device)


def view_transform_no_color(size: int):
    from config import AugConfig

    aug = AugConfig(jitter_p=0.0, gray_p=0.0, blur_p=0.0)
    return view_transform(aug, size, (0.08, 1.0), color=True)


if __name__ == "__main__":
    sys.exit(main())
