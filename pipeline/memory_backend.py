"""In-memory backend for small data sets: decode every image once, then augment whole batches as tensor ops.

The whole set is decoded (in parallel workers) and resized to `data.image_size` squared uint8, kept on the
training device; each batch is gathered by id and goes through the batched random-resized-crop, flip and colour
augmentation of `pipeline.augment`. At small sizes this is much faster than per-image PIL augmentation on a CPU, which
is what lets the demo give every instance hundreds of visits in a few minutes. Not for ImageNet-sized sets
(1.28M x 3 x 224² bytes = 193 GB).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader

from config import Config
from pipeline.augment import DeviceViews, batch_random_resized_crop
from pipeline.base import (
    BadFiles,
    Batch,
    LoaderBase,
    first_good,
    ignore_stop_signals,
    to_device_async,
    worker_batches,
)
from pipeline.dataset import InstanceIndex
from pipeline.decode import DecodedImages, collate_decoded


def _resized_tensor(size: int):
    def resize(img) -> torch.Tensor:  # PIL RGB -> uint8 [3,size,size]
        from PIL import Image

        return torch.from_numpy(np.asarray(img.resize((size, size), Image.BILINEAR)).copy()).permute(2, 0, 1)

    return resize


def decode_all(index: InstanceIndex, size: int, workers: int) -> tuple[torch.Tensor, dict[int, str]]:
    """uint8 [N,3,size,size] and {id: reason} for files that could not be decoded (left black, never sampled)."""
    out = torch.zeros(len(index), 3, size, size, dtype=torch.uint8)
    bad: dict[int, str] = {}
    dl = DataLoader(DecodedImages(index, _resized_tensor(size)), batch_size=64, num_workers=workers,
                    collate_fn=collate_decoded, worker_init_fn=ignore_stop_signals)
    for images, ids, failed in worker_batches(dl):
        if images is not None:
            out[ids] = images
        bad.update(failed)
    return out, bad


class MemoryLoader(LoaderBase):
    name = "memory"

    def __init__(self, cfg: Config, index: InstanceIndex, schedule, device: torch.device, batch_size: int,
                 bad_files: BadFiles | None = None):
        super().__init__(cfg, index, schedule, device, batch_size, bad_files)
        self.views = DeviceViews(cfg.aug, cfg.data.image_size, self.seed)
        images, bad = decode_all(index, cfg.data.image_size, cfg.data.workers)
        for iid, reason in sorted(bad.items()):
            self.bad_files.add(iid, reason)
        self.images = images.to(self.device)

    def batch_ids(self, order: np.ndarray, k: int) -> np.ndarray:
        """Ids of batch k of a unit, undecodable images replaced (`pipeline.base.substitutes`)."""
        b = self.batch_size
        ids = order[k * b:(k + 1) * b].copy()
        for j in np.flatnonzero([i in self.bad_files for i in ids.tolist()]):
            ids[j] = first_good(order, k * b + int(j), self.bad_files, self._known_good)[0]
        return ids

    def _known_good(self, iid: int) -> None:
        """Everything was decoded up front: an id is good unless recorded bad (walk skips those)."""

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        order = np.asarray(self.schedule.order(epoch), dtype=np.int64)
        for k in range(start_batch, len(order) // self.batch_size):
            ids_host = torch.from_numpy(self.batch_ids(order, k))
            ids = to_device_async(ids_host, self.device)
            raw = self.images.index_select(0, ids).float().div_(255.0)
            views = self.views(partial(batch_random_resized_crop, raw), epoch, k, self.rows)
            yield Batch(views[0], ids, tuple(views[1:]), ids_host)
