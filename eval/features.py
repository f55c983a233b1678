"""Deterministic feature extraction for evaluation (no augmentation): resize, centre crop, normalise."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2 as T

from pipeline.base import IMAGENET_MEAN, IMAGENET_STD
from pipeline.dataset import DataError, InstanceIndex
from pipeline.decode import DecodedImages, collate_decoded


def eval_transform(size: int, resize_ratio: float | None = None) -> T.Compose:
    """Resize the short side to size·ratio, centre-crop `size`. Default ratio: 256/224 (the ImageNet protocol) for
    large crops, 1 for small images (a 32-px digit should not lose its border)."""
    ratio = resize_ratio if resize_ratio is not None else (256 / 224 if size >= 96 else 1.0)
    return T.Compose([T.Resize(round(size * ratio), antialias=True), T.CenterCrop(size), T.PILToTensor(),
                      T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def report_undecodable(index: InstanceIndex, bad: list[int]) -> None:
    """One line naming what an evaluation left out (an evaluation scores the images it could read)."""
    if bad:
        names = ", ".join(index.paths[i] for i in bad[:3]) + (", ..." if len(bad) > 3 else "")
        print(f"note: {len(bad)} undecodable image(s) of {index.root} left out of the evaluation: {names}",
              flush=True)


@torch.no_grad()
def extract(fn: Callable[[torch.Tensor], torch.Tensor], index: InstanceIndex, size: int, device: torch.device,
            batch_size: int = 256, workers: int = 2, resize_ratio: float | None = None,
            report: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features [M,D] (float32, CPU), labels [M], instance ids [M] for the decodable images of `index` (the others
    are left out, and named unless `report` is False: a caller that extracts the same images again)."""
    dl = DataLoader(DecodedImages(index, eval_transform(size, resize_ratio)), batch_size=batch_size,
                    num_workers=workers, collate_fn=collate_decoded)
    feats, ids, bad = [], [], []
    for x, i, failed in dl:
        bad += [iid for iid, _ in failed]
        if x is None:
            continue
        feats.append(fn(x.to(device)).float().cpu())
        ids.append(i)
    if report:
        report_undecodable(index, bad)
    if not feats:
        raise DataError(f"no image of {index.root} decodes: nothing to evaluate")
    ids = torch.cat(ids)
    return torch.cat(feats), torch.from_numpy(index.labels[ids.numpy()]), ids
