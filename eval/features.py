"""Deterministic feature extraction for evaluation (no augmentation): resize, centre crop, normalise."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T

from pipeline.base import IMAGENET_MEAN, IMAGENET_STD
from pipeline.dataset import DataError, InstanceIndex
from pipeline.decode import CorruptImageError, decode_rgb


def eval_transform(size: int, resize_ratio: float | None = None) -> T.Compose:
    """Resize the short side to size·ratio, centre-crop `size`. Default ratio: 256/224 (the ImageNet protocol) for
    large crops, 1 for small images (a 32-px digit should not lose its border)."""
    ratio = resize_ratio if resize_ratio is not None else (256 / 224 if size >= 96 else 1.0)
    return T.Compose([T.Resize(round(size * ratio), antialias=True), T.CenterCrop(size), T.PILToTensor(),
                      T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class EvalImages(Dataset):
    """index -> (tensor, label, id); undecodable files give a zero image and label -2 (dropped by the caller)."""

    def __init__(self, index: InstanceIndex, transform: Callable):
        self.index, self.transform = index, transform

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        try:
            x = self.transform(decode_rgb(self.index.abspath(i)))
            return x, int(self.index.labels[i]), i
        except (CorruptImageError, FileNotFoundError):
            return None, -2, i


def _collate(items):
    """-> (images or None when none decoded, labels, ids, ids of the undecodable images)."""
    good = [it for it in items if it[0] is not None]
    bad = [it[2] for it in items if it[0] is None]
    if not good:
        return None, torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), bad
    return (torch.stack([g[0] for g in good]), torch.tensor([g[1] for g in good]), torch.tensor([g[2] for g in good]),
            bad)


def report_undecodable(index: InstanceIndex, bad: list[int]) -> None:
    """One line naming what an evaluation left out (an evaluation scores the images it could read)."""
    if bad:
        names = ", ".join(index.paths[i] for i in bad[:3]) + (", ..." if len(bad) > 3 else "")
        print(f"note: {len(bad)} undecodable image(s) of {index.root} left out of the evaluation: {names}",
              flush=True)


@torch.no_grad()
def extract(fn: Callable[[torch.Tensor], torch.Tensor], index: InstanceIndex, size: int, device: torch.device,
            batch_size: int = 256, workers: int = 2,
            resize_ratio: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features [M,D] (float32, CPU), labels [M], instance ids [M] for the decodable images of `index`."""
    dl = DataLoader(EvalImages(index, eval_transform(size, resize_ratio)), batch_size=batch_size,
                    num_workers=workers, collate_fn=_collate)
    feats, labels, ids, bad = [], [], [], []
    for x, y, i, b in dl:
        bad += b
        if x is None:
            continue
        feats.append(fn(x.to(device)).float().cpu())
        labels.append(y)
        ids.append(i)
    report_undecodable(index, bad)
    if not feats:
        raise DataError(f"no image of {index.root} decodes: nothing to evaluate")
    return torch.cat(feats), torch.cat(labels), torch.cat(ids)
