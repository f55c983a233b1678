"""Pure-PyTorch GPU data path (`data.backend=torch-gpu`): workers only read bytes, the GPU decodes and augments.

DataLoader workers read the raw JPEG bytes of a batch (no decoding on the CPU); the main process decodes the whole
batch with `torchvision.io.decode_jpeg(device="cuda")` (nvJPEG), then random-resized-crop + flip per image and the
SimCLR colour augmentations batched on the GPU (`pipeline.augment`). It is what runs on a GPU machine where DALI and
FFCV cannot be installed. On a CPU-only machine the same code decodes with libjpeg on the CPU (used by the tests).

Files that are not JPEG (PNG behind a .jpg name, ...) are decoded on the CPU with PIL; files that do not decode are
skipped with a warning and counted, as in the other backends.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_jpeg

from config import Config
from pipeline.augment import DeviceViews, sample_rrc_boxes
from pipeline.base import Batch, note_corrupt
from pipeline.dataset import InstanceIndex
from pipeline.decode import CorruptImageError, decode_rgb
from pipeline.torch_backend import ScheduleBatchSampler

JPEG_MAGIC = b"\xff\xd8"


class RawBytes(Dataset):
    """key (epoch, position, id) -> (id, uint8 tensor of the file's bytes, path)."""

    def __init__(self, index: InstanceIndex):
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key):
        _, _, iid = key
        path = self.index.abspath(iid)
        with open(path, "rb") as f:
            data = f.read()
        return iid, torch.frombuffer(bytearray(data), dtype=torch.uint8), path


def _collate(items):
    return items


def decode_batch(items, device: torch.device) -> tuple[list[int], list[torch.Tensor], dict[int, str]]:
    """[(id, bytes, path)] -> ids, images [3,H,W] uint8 on `device`, {id: reason} for undecodable files."""
    jpeg = [it for it in items if it[1].numel() > 2 and bytes(it[1][:2].tolist()) == JPEG_MAGIC]
    other = [it for it in items if not (it[1].numel() > 2 and bytes(it[1][:2].tolist()) == JPEG_MAGIC)]
    ids, images, bad = [], [], {}
    if jpeg:
        try:
            decoded = decode_jpeg([it[1] for it in jpeg], mode=ImageReadMode.RGB, device=device)
            ok = list(zip(jpeg, decoded, strict=True))
        except RuntimeError:  # one bad file fails the batch call: fall back to one by one
            ok = []
            for it in jpeg:
                try:
                    ok.append((it, decode_jpeg(it[1], mode=ImageReadMode.RGB, device=device)))
                except RuntimeError as e:
                    bad[it[0]] = f"{it[2]}: {e}"
        for it, img in ok:
            ids.append(it[0])
            images.append(img)
    for iid, _, path in other:  # PNG behind a .jpg name, CMYK, 16-bit, ...: PIL on the CPU
        try:
            arr = np.asarray(decode_rgb(path))
        except (CorruptImageError, FileNotFoundError) as e:
            bad[iid] = str(e)
            continue
        ids.append(iid)
        images.append(torch.from_numpy(arr.copy()).permute(2, 0, 1).to(device))
    return ids, images, bad


def crop_resize_flip(images: list[torch.Tensor], size: int, scale, ratio, flip_p: float,
                     gen: torch.Generator) -> torch.Tensor:
    """Per-image random-resized-crop (antialiased bilinear) + flip of differently sized images -> [B,3,size,size]
    float in [0,1]."""
    h = torch.tensor([im.shape[1] for im in images])
    w = torch.tensor([im.shape[2] for im in images])
    boxes = sample_rrc_boxes(h, w, scale, ratio, gen).round().long().tolist()
    flips = (torch.rand(len(images), generator=gen) < flip_p).tolist()
    out = []
    for im, (x1, y1, x2, y2), flip in zip(images, boxes, flips, strict=True):
        crop = im[None, :, y1:y2, x1:x2].float()
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(crop.flip(-1) if flip else crop)
    return torch.cat(out).div_(255.0).clamp_(0, 1)


class TorchGPULoader:
    def __init__(self, cfg: Config, index: InstanceIndex, schedule, device: torch.device, batch_size: int):
        self.cfg = cfg
        self.num_instances = len(index)
        self.schedule = schedule
        self.device = device
        self.batch_size = batch_size
        self.seed = cfg.run.seed
        self.views = DeviceViews(cfg.aug, cfg.data.image_size, self.seed)
        self.sampler = ScheduleBatchSampler(schedule, batch_size)
        workers = cfg.data.workers
        self.loader = DataLoader(RawBytes(index), batch_sampler=self.sampler, num_workers=workers,
                                 collate_fn=_collate, persistent_workers=workers > 0,
                                 prefetch_factor=4 if workers > 0 else None)
        self.corrupt: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.schedule.order(0)) // self.batch_size

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        self.sampler.set(epoch, start_batch)
        for k, items in enumerate(self.loader, start=start_batch):
            ids, images, bad = decode_batch(items, self.device)
            note_corrupt(self.corrupt, bad.items())
            if not ids:
                continue
            views = self.views(partial(crop_resize_flip, images), epoch, k)
            yield Batch(views[0], torch.tensor(ids, dtype=torch.int64, device=self.device), tuple(views[1:]))
