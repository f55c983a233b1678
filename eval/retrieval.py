"""Instance retrieval: can the model find an image's own id from a fresh augmented view of it?

Gallery: the embedding of every training image's plain (resized, centre) view. Query: the embedding of one new
random augmented view per image (the training augmentation, with a seed the training never used). Top-1 is the
percentage of queries whose nearest gallery entry (cosine) is the same instance: what PIC trains for.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from config import AugConfig
from eval.features import extract
from pipeline.augment import seed_for, view_transform
from pipeline.dataset import InstanceIndex
from pipeline.decode import CorruptImageError, decode_rgb


class _AugViews(Dataset):
    def __init__(self, index: InstanceIndex, transform, seed: int):
        self.index, self.transform, self.seed = index, transform, seed

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        try:
            img = decode_rgb(self.index.abspath(i))
        except (CorruptImageError, FileNotFoundError):
            return None, i
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed_for(self.seed, 0x5E7, i))
            return self.transform(img), i


def _collate(items):
    good = [it for it in items if it[0] is not None]
    if not good:  # a batch of undecodable images (named by `extract` for the gallery)
        return None, None
    return torch.stack([g[0] for g in good]), torch.tensor([g[1] for g in good])


@torch.no_grad()
def retrieval_top1(embed: Callable[[torch.Tensor], torch.Tensor], index: InstanceIndex, aug: AugConfig, size: int,
                   device: torch.device, seed: int = 0, batch_size: int = 256, workers: int = 2) -> float:
    gallery, _, gallery_ids = extract(embed, index, size, device, batch_size, workers)
    gallery = F.normalize(gallery, dim=1)
    dl = DataLoader(_AugViews(index, view_transform(aug, size, aug.crop_scale, color=True), seed),
                    batch_size=batch_size, num_workers=workers, collate_fn=_collate)
    hits = total = 0
    for x, ids in dl:
        if x is None:
            continue
        q = F.normalize(embed(x.to(device)).float().cpu(), dim=1)
        nearest = gallery_ids[(q @ gallery.t()).argmax(1)]
        hits += int((nearest == ids).sum())
        total += len(ids)
    return 100.0 * hits / max(total, 1)
