"""The reference backend: torch DataLoader workers decode with PIL and augment with torchvision.

Readable, and the baseline the FFCV and DALI backends are benchmarked against. The order of every epoch (or
window) comes from our scheduler; each sample's augmentation is seeded by (seed, epoch, its position in the unit's
global order), so the batches depend neither on the number of workers, nor on where a resumed run starts, nor on
the world size.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from config import Config
from pipeline.augment import BatchColorAugment, generator, seed_for, view_specs, view_transform
from pipeline.base import BadFiles, Batch, LoaderBase, ScheduleBatchSampler, first_good, ignore_stop_signals
from pipeline.dataset import DataError, InstanceIndex
from pipeline.decode import CorruptImageError, DecodedImages
from pipeline.schedule import BatchRows


class ViewsDataset(Dataset):
    """Item key (epoch, position, instance id) -> (id used, view tensors, [(bad id, reason), ...]).

    An undecodable image is replaced by the next decodable one of the unit's order (`pipeline.base.substitutes`):
    the worker walks the order itself, so a batch always comes back with B samples. The ids found bad travel back
    with the item; the main process records them. A worker remembers what it found (persistent workers), and ids
    recorded before the workers started (e.g. by an earlier run) are never decoded.
    """

    def __init__(self, index: InstanceIndex, transforms: list, seed: int, schedule, rows: BatchRows):
        self.index = index
        self.transforms = transforms
        self.seed = seed
        self.schedule = schedule
        self.rows = rows  # this rank's rows of every global batch: a key's position -> its global position
        self.decoded = DecodedImages(index, transform=None)  # decode or say why not
        self.bad = BadFiles(announce=False)
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, order) of the last unit walked

    def __len__(self) -> int:
        return len(self.index)

    def _unit_order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.asarray(self.schedule.order(epoch), dtype=np.int64))
        return self._order[1]

    def __getitem__(self, key: tuple[int, int, int]):
        """-> (id used, views, new bad [(id, reason)], error): error is set (and views None) when no image of the
        unit decodes; the main process raises it after recording the bad ids (a raise here would come out of the
        DataLoader as a worker traceback, and lose them)."""
        epoch, position, iid = key
        known = len(self.bad.reasons)
        try:
            img, _, reason = (None, iid, "") if iid in self.bad else self.decoded[iid]
            if img is None:  # the unit's order is computed only now: almost every item decodes
                if reason:
                    self.bad.add(iid, reason)
                iid, img = first_good(self._unit_order(epoch), position, self.bad, self._decode)
        except DataError as e:
            return iid, None, self._new_bad(known), str(e)
        # The CPU generator only (what the transforms draw from): torch.manual_seed also queues a CUDA/XPU/MTIA
        # seed, and each of those records a stack trace when the device is not initialised: 3 per image, ~1 ms,
        # a fifth of a worker's time per image (the README's loader table, "torch" against stock torchvision).
        seed = seed_for(self.seed, epoch, self.rows.global_position(position))
        if torch.utils.data.get_worker_info() is not None:  # a worker's global generator is its own: just seed it
            torch.default_generator.manual_seed(seed)
            views = tuple(t(img) for t in self.transforms)
        else:  # in the training process (workers=0): leave its generator as it was
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)
                views = tuple(t(img) for t in self.transforms)
        return iid, views, self._new_bad(known), ""

    def _new_bad(self, known: int) -> list[tuple[int, str]]:
        """The ids recorded since there were `known` (dicts keep insertion order)."""
        if len(self.bad.reasons) == known:
            return []
        return list(self.bad.reasons.items())[known:]

    def _decode(self, iid: int):
        img, _, reason = self.decoded[iid]
        if img is None:
            raise CorruptImageError(reason)
        return img


def collate_views(items):
    """-> ids int64 [B], views (each [B,...]), [(bad id, reason)] found while making them, error ("" or why no
    image of the unit decodes: ids and views are None then)."""
    bad = [b for it in items for b in it[2]]
    error = next((it[3] for it in items if it[3]), "")
    if error:
        return None, None, bad, error
    ids = torch.tensor([it[0] for it in items], dtype=torch.int64)
    views = tuple(torch.stack([it[1][v] for it in items]) for v in range(len(items[0][1])))
    return ids, views, bad, ""


class TorchLoader(LoaderBase):
    """DataLoader + PIL decode; colour augmentation on the workers (`data.color_aug_on=worker`) or batched on the
    target device (`device`), in which case the workers only decode, crop and flip."""

    name = "torch"

    def __init__(self, cfg: Config, index: InstanceIndex, schedule, device: torch.device, batch_size: int,
                 bad_files: BadFiles | None = None):
        super().__init__(cfg, index, schedule, device, batch_size, bad_files)
        self.color_on_device = cfg.data.color_aug_on == "device"
        specs = view_specs(cfg.aug, cfg.data.image_size)
        transforms = [view_transform(cfg.aug, size, scale, color=not self.color_on_device) for size, scale in specs]
        self.device_color = [BatchColorAugment(cfg.aug, size) for size, _ in specs] if self.color_on_device else []
        self.sampler = ScheduleBatchSampler(schedule, batch_size)
        self.dataset = ViewsDataset(index, transforms, self.seed, schedule, self.rows)
        self.dataset.bad.reasons.update(self.bad_files.reasons)  # known before the workers start: never decoded
        workers = cfg.data.workers
        self.loader = DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            num_workers=workers,
            collate_fn=collate_views,
            pin_memory=cfg.data.pin_memory and self.device.type == "cuda",
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
            worker_init_fn=ignore_stop_signals,
        )

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        self.sampler.set(epoch, start_batch)
        for k, (ids, views, bad, error) in enumerate(self.loader, start=start_batch):
            for iid, reason in bad:
                self.bad_files.add(iid, reason)
            if error:
                raise DataError(error)
            views = tuple(v.to(self.device, non_blocking=True) for v in views)
            if self.color_on_device:
                views = tuple(aug(v, generator(self.seed, epoch, k, i), self.rows)
                              for i, (aug, v) in enumerate(zip(self.device_color, views, strict=True)))
            yield Batch(views[0], ids.to(self.device, non_blocking=True), views[1:], ids)
