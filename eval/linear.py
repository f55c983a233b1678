"""Linear probe (spec §8): a new fc on frozen backbone features.

    python -m eval.linear --ckpt runs/NAME/last.pt --train DIR_OR_BETON --val DIR_OR_BETON [--epochs 100] [--cached]

The fc has one output per class of the training set; validation labels are class names mapped through those
classes (eval.labels): validation images of a class the training set lacks, and unlabelled images on either side,
are left out and counted.

Protocol of the PIC code: SGD lr 30 (not batch-scaled), momentum 0.9, wd 0, batch 256, 100 epochs, 5 warm-up
epochs from lr/100 then cosine; train augmentation RandomResizedCrop(0.08, 1) + flip; val resize + centre crop.
Its quirk is kept by default: the frozen backbone stays in train mode, so BN uses batch statistics (and updates
its running stats); `--bn=eval` gives MoCo's protocol. `--cached` extracts centre-crop features once and trains
the fc on them (no augmentation, BN in eval mode): minutes instead of hours on a CPU.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from eval.common import eval_parser, load_backbone_fn
from eval.features import extract, report_undecodable
from eval.labels import align_labels
from model.optim import lr_at
from pipeline.augment import view_transform
from pipeline.beton import open_index
from pipeline.dataset import DataError
from pipeline.decode import DecodedImages, collate_decoded


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


def linear_probe(backbone: nn.Module, train_index, val_index, size: int, device: torch.device, *, epochs: int = 100,
                 lr: float = 30.0, batch_size: int = 256, bn: str = "train", cached: bool = False,
                 workers: int = 2) -> dict:
    """Train a new fc on the frozen backbone and score it on `val_index`: {"top1", "top5", "val_features"}.

    The validation features are extracted after the fc is trained, with the backbone in eval mode: with
    `bn="train"` its BN running statistics were updated during linear training, and the released
    `main_linear.py` validates that model (features taken before training were normalised with the
    pre-training statistics the fc never saw)."""
    train_kept = np.flatnonzero(train_index.labels >= 0)
    if not len(train_kept):
        raise DataError(f"no image of {train_index.root} has a label: nothing to train a linear probe on")
    if (line := align_labels(train_index.classes, train_index).note(f"linear probe training images of "
                                                                   f"{train_index.root}")):
        print(line, flush=True)
    val = align_labels(train_index.classes, val_index)
    if (line := val.note(f"linear probe validation images of {val_index.root}")):
        print(line, flush=True)
    if not len(val.kept):
        raise DataError(f"no image of {val_index.root} has a class of the training set")
    fc = nn.Linear(_feature_dim(backbone, size, device), len(train_index.classes)).to(device)
    fc.weight.data.normal_(0, 0.01)
    fc.bias.data.zero_()
    if cached:
        backbone.eval()
        ftr, ytr, _ = extract(backbone, train_index, size, device, workers=workers, positions=train_kept)
        dl = DataLoader(TensorDataset(ftr.to(device), ytr.to(device)), batch_size=batch_size, shuffle=True)
        train_linear(fc, lambda: dl, epochs, lr)
    else:
        backbone.train(bn == "train")
        dl = DataLoader(Subset(DecodedImages(train_index, view_transform_no_color(size)), train_kept.tolist()),
                        batch_size=batch_size, shuffle=True, drop_last=False, num_workers=workers,
                        collate_fn=collate_decoded)
        batches = _Batches(dl, train_index.labels, device)
        train_linear(fc, lambda: batches, epochs, lr, features_fn=backbone)
        report_undecodable(train_index, sorted(batches.bad))
    backbone.eval()
    fva, _, ids = extract(backbone, val_index, size, device, workers=workers, positions=val.kept)
    top1, top5 = accuracy(fc.cpu(), fva, torch.from_numpy(val.labels[ids.numpy()]))
    return {"top1": top1, "top5": top5, "val_features": fva, "val_images": len(ids),
            "val_left_out_unknown_class": val.unknown}


@torch.no_grad()
def _feature_dim(backbone: nn.Module, size: int, device: torch.device) -> int:
    was_training = backbone.training
    backbone.eval()
    dim = backbone(torch.zeros(1, 3, size, size, device=device)).shape[1]
    backbone.train(was_training)
    return dim


def main(argv: list[str] | None = None) -> int:
    ap = eval_parser("linear probe on a frozen PIC backbone (spec §8)", "labelled training folder",
                     "labelled validation folder")
    ap.add_argument("--epochs", type=int, default=100, help="linear-training epochs")
    ap.add_argument("--lr", type=float, default=30.0, help="SGD lr (not batch-scaled), 5 warm-up epochs, cosine")
    ap.add_argument("--batch-size", type=int, default=256, help="images per linear-training step")
    ap.add_argument("--bn", choices=("train", "eval"), default="train",
                    help="backbone BN during linear training: batch statistics (the PIC code) or frozen (MoCo)")
    ap.add_argument("--cached", action="store_true",
                    help="train on centre-crop features extracted once (fast; no augmentation, BN frozen)")
    args = ap.parse_args(argv)
    backbone, size, device = load_backbone_fn(args)
    out = linear_probe(backbone, open_index(args.train), open_index(args.val), size, device, epochs=args.epochs,
                       lr=args.lr, batch_size=args.batch_size, bn=args.bn, cached=args.cached, workers=args.workers)
    print(f"linear probe: top-1 {out['top1']:.2f}  top-5 {out['top5']:.2f}  ({args.epochs} epochs, "
          f"{'cached features' if args.cached else 'augmented, BN ' + args.bn})")
    return 0


class _Batches:
    """Re-iterable view of a DataLoader yielding (x, y) on the device, skipping empty (all-corrupt) batches."""

    def __init__(self, dl, labels, device):
        self.dl, self.labels, self.device = dl, torch.from_numpy(labels), device
        self.bad: set[int] = set()  # ids of undecodable training images (named once, after training)

    def __len__(self) -> int:
        return len(self.dl)

    def __iter__(self):
        for x, ids, failed in self.dl:
            self.bad.update(iid for iid, _ in failed)
            if x is not None:
                yield x.to(self.device), self.labels[ids].to(self.device)


def view_transform_no_color(size: int):
    from config import AugConfig

    aug = AugConfig(jitter_p=0.0, gray_p=0.0, blur_p=0.0)
    return view_transform(aug, size, (0.08, 1.0), color=True)


if __name__ == "__main__":
    from eval.common import run_cli

    sys.exit(run_cli(main, sys.argv[1:]))
