"""The reference backend: torch DataLoader workers decode with PIL and augment with torchvision.

Readable, and the baseline the FFCV and DALI backends are benchmarked against. The order of every epoch (or
window) comes from our scheduler; each sample's augmentation is seeded by (seed, epoch, position), so the batches
do not depend on the number of workers or on where a resumed run starts.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from config import Config
from pipeline.augment import BatchColorAugment, generator, seed_for, view_specs, view_transform
from pipeline.base import Batch, note_corrupt
from pipeline.dataset import InstanceIndex
from pipeline.decode import CorruptImageError, decode_rgb


class ViewsDataset(Dataset):
    """Item key (epoch, position, instance id) -> (id, view tensors) or (id, None, reason) if undecodable."""

    def __init__(self, index: InstanceIndex, transforms: list, seed: int):
        self.index = index
        self.transforms = transforms
        self.seed = seed

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: tuple[int, int, int]):
        epoch, position, iid = key
        try:
            img = decode_rgb(self.index.abspath(iid))
        except (CorruptImageError, FileNotFoundError) as e:
            return iid, None, str(e)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed_for(self.seed, epoch, position))
            views = tuple(t(img) for t in self.transforms)
        return iid, views, ""


def collate_views(items):
    """Stack the decodable samples; report the others (corrupt files are skipped, never a crash)."""
    good = [it for it in items if it[1] is not None]
    bad = [(it[0], it[2]) for it in items if it[1] is None]
    if not good:
        return None, None, bad
    ids = torch.tensor([it[0] for it in good], dtype=torch.int64)
    views = tuple(torch.stack([it[1][v] for it in good]) for v in range(len(good[0][1])))
    return ids, views, bad


class ScheduleBatchSampler(Sampler):
    """Yields lists of (epoch, position, id) keys for one epoch/window of the schedule, drop_last."""

    def __init__(self, schedule, batch_size: int):
        self.schedule = schedule
        self.batch_size = batch_size
        self.epoch = 0
        self.start_batch = 0

    def set(self, epoch: int, start_batch: int) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return len(self.schedule.order(self.epoch)) // self.batch_size - self.start_batch

    def __iter__(self):
        order = np.asarray(self.schedule.order(self.epoch), dtype=np.int64)
        b = self.batch_size
        for k in range(self.start_batch, len(order) // b):
            yield [(self.epoch, k * b + j, int(order[k * b + j])) for j in range(b)]


class TorchLoader:
    """DataLoader + PIL decode; colour augmentation on the workers (`data.color_aug_on=worker`) or batched on the
    target device (`device`), in which case the workers only decode, crop and flip."""

    def __init__(self, cfg: Config, index: InstanceIndex, schedule, device: torch.device, batch_size: int):
        self.cfg = cfg
        self.index = index
        self.num_instances = len(index)
        self.schedule = schedule
        self.device = device
        self.batch_size = batch_size
        self.seed = cfg.run.seed
        self.color_on_device = cfg.data.color_aug_on == "device"
        specs = view_specs(cfg.aug, cfg.data.image_size)
        transforms = [view_transform(cfg.aug, size, scale, color=not self.color_on_device) for size, scale in specs]
        self.device_color = [BatchColorAugment(cfg.aug, size) for size, _ in specs] if self.color_on_device else []
        self.sampler = ScheduleBatchSampler(schedule, batch_size)
        workers = cfg.data.workers
        self.loader = DataLoader(
            ViewsDataset(index, transforms, self.seed),
            batch_sampler=self.sampler,
            num_workers=workers,
            collate_fn=collate_views,
            pin_memory=cfg.data.pin_memory and device.type == "cuda",
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
        )
        self.corrupt: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.schedule.order(0)) // self.batch_size

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        self.sampler.set(epoch, start_batch)
        for k, (ids, views, bad) in enumerate(self.loader, start=start_batch):
            note_corrupt(self.corrupt, bad)
            if ids is None:
                continue
            views = tuple(v.to(self.device, non_blocking=True) for v in views)
            if self.color_on_device:
                views = tuple(aug(v, generator(self.seed, epoch, k, i))
                              for i, (aug, v) in enumerate(zip(self.device_color, views, strict=True)))
            yield Batch(views[0], ids.to(self.device, non_blocking=True), views[1:])
