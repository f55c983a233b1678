"""Deterministic feature extraction for evaluation (no augmentation): resize, centre crop, normalise."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
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
def iter_features(fn: Callable[[torch.Tensor], torch.Tensor], index: InstanceIndex, size: int, device: torch.device,
                  batch_size: int = 256, workers: int = 2, resize_ratio: float | None = None,
                  positions: np.ndarray | None = None, bad: list[int] | None = None,
                  transform=None, seed: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(features [b,D] float32 CPU, instance ids [b]) of the decodable images of `index` (only `positions`, when
    given), batch by batch: a caller that streams them holds one batch, whatever the size of the index. The ids of
    undecodable images are appended to `bad`. transform / seed: another view than the centre crop."""
    ds = DecodedImages(index, transform or eval_transform(size, resize_ratio), seed=seed)
    if positions is not None:
        ds = Subset(ds, np.asarray(positions, np.int64).tolist())
    dl = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate_decoded)
    for x, ids, failed in dl:
        if bad is not None:
            bad += [iid for iid, _ in failed]
        if x is not None:
            yield fn(x.to(device)).float().cpu(), ids


def extract(fn: Callable[[torch.Tensor], torch.Tensor], index: InstanceIndex, size: int, device: torch.device,
            batch_size: int = 256, workers: int = 2, resize_ratio: float | None = None,
            report: bool = True, positions: np.ndarray | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features [M,D] (float32, CPU), labels [M], instance ids [M] for the decodable images of `index` (or of its
    `positions`); the others are left out, and named unless `report` is False (a caller that extracts the same images
    again). Raises DataError when none decodes."""
    bad: list[int] = []
    parts = list(iter_features(fn, index, size, device, batch_size, workers, resize_ratio, positions, bad))
    if report:
        report_undecodable(index, bad)
    if not parts:
        raise DataError(f"no image of {index.root} decodes: nothing to evaluate")
    ids = torch.cat([i for _, i in parts])
    return torch.cat([f for f, _ in parts]), torch.from_numpy(index.labels[ids.numpy()]), ids
