"""Instance retrieval: can the model find an image's own id from a fresh augmented view of it?

Gallery: the embedding of every training image's plain (resized, centre) view. Query: the embedding of one new
random augmented view per image (the training augmentation, with a seed the training never used). Top-1 is the
percentage of queries whose nearest gallery entry (cosine) is the same instance: what PIC trains for.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from config import AugConfig
from eval.features import extract
from pipeline.augment import view_transform
from pipeline.dataset import InstanceIndex
from pipeline.decode import DecodedImages, collate_decoded


@torch.no_grad()
def retrieval_top1(embed: Callable[[torch.Tensor], torch.Tensor], index: InstanceIndex, aug: AugConfig, size: int,
                   device: torch.device, seed: int = 0, batch_size: int = 256, workers: int = 2,
                   report: bool = True) -> float:
    gallery, _, gallery_ids = extract(embed, index, size, device, batch_size, workers, report=report)
    gallery = F.normalize(gallery, dim=1)
    dl = DataLoader(DecodedImages(index, view_transform(aug, size, aug.crop_scale, color=True), seed=seed),
                    batch_size=batch_size, num_workers=workers, collate_fn=collate_decoded)
    hits = total = 0
    for x, ids, _ in dl:  # undecodable images: named by `extract` for the gallery
        if x is None:
            continue
        q = F.normalize(embed(x.to(device)).float().cpu(), dim=1)
        nearest = gallery_ids[(q @ gallery.t()).argmax(1)]
        hits += int((nearest == ids).sum())
        total += len(ids)
    return 100.0 * hits / max(total, 1)
