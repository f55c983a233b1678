"""Instance retrieval: can the model find an image's own id from a fresh augmented view of it?

Gallery: the embedding of the plain (resized, centre) view of every training image, or, when N is larger than
`GALLERY` (100,000), of a seeded subset of that many: the retrieval task then has 10⁵ candidates at any N, and the
evaluation holds 10⁵ embeddings, not N (at N = 10⁸ the full gallery alone is 51 GB, and [256, N] logits per batch).
Query: the embedding of one new random augmented view of each gallery image (the training augmentation, with a
seed the training never used). Top-1 is the percentage of queries whose nearest gallery entry (cosine) is the same
instance: what PIC trains for.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from config import AugConfig
from eval.features import extract, iter_features
from pipeline.augment import view_transform
from pipeline.dataset import InstanceIndex

GALLERY = 100_000  # instances in the retrieval gallery at most (a seeded subset above that)
QUERY_CHUNK = 64  # queries scored at once: [64, GALLERY] similarities (26 MB)


def gallery_positions(n: int, seed: int, size: int | None = None) -> np.ndarray | None:
    """Sorted positions of the gallery (a seeded subset of `size` (GALLERY) of n), or None for all n."""
    size = GALLERY if size is None else size
    if n <= size:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


@torch.no_grad()
def retrieval_top1(embed: Callable[[torch.Tensor], torch.Tensor], index: InstanceIndex, aug: AugConfig, size: int,
                   device: torch.device, seed: int = 0, batch_size: int = 256, workers: int = 2,
                   report: bool = True, gallery_size: int | None = None) -> tuple[float, int]:
    """(top-1 %, the gallery's size: instances drawn, decodable or not). Raises DataError when no gallery image
    decodes."""
    positions = gallery_positions(len(index), seed, gallery_size)
    gallery, _, gallery_ids = extract(embed, index, size, device, batch_size, workers, report=report,
                                      positions=positions)
    gallery = F.normalize(gallery, dim=1)
    hits = total = 0
    queries = iter_features(embed, index, size, device, batch_size, workers, positions=positions,
                            transform=view_transform(aug, size, aug.crop_scale, color=True), seed=seed)
    for q, ids in queries:  # undecodable images: named by `extract` for the gallery
        q = F.normalize(q, dim=1)
        for s in range(0, len(ids), QUERY_CHUNK):
            nearest = gallery_ids[(q[s:s + QUERY_CHUNK] @ gallery.t()).argmax(1)]
            hits += int((nearest == ids[s:s + QUERY_CHUNK]).sum())
        total += len(ids)
    return 100.0 * hits / max(total, 1), len(index) if positions is None else len(positions)
