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
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_jpeg

from config import Config
from pipeline.augment import DeviceViews, rand_rows, sample_rrc_boxes
from pipeline.base import (
    BadFiles,
    Batch,
    LoaderBase,
    ScheduleBatchSampler,
    first_good,
    ignore_stop_signals,
    to_device_async,
)
from pipeline.dataset import InstanceIndex
from pipeline.decode import CorruptImageError, DecodedImages
from pipeline.schedule import BatchRows

JPEG_MAGIC = b"\xff\xd8"


class RawBytes(Dataset):
    """key (epoch, position, id) -> (id, the file's bytes). Plain `bytes` travel through the worker queue by
    pickling; `collate_bytes` packs a batch into one tensor."""

    def __init__(self, index: InstanceIndex):
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key):
        _, _, iid = key
        try:
            with open(self.index.abspath(iid), "rb") as f:
                return iid, f.read()
        except OSError:  # vanished or unreadable: reported as undecodable by the main process
            return iid, b""


class PackedBytes(NamedTuple):
    """A batch of encoded files: file i is data[offsets[i]:offsets[i+1]].

    One uint8 tensor per batch, so a worker hands over one shared-memory block (one file descriptor) per batch;
    a tensor per file was B descriptors per batch, and at batch 256 with 16 workers and `ulimit -n 1024` the
    queue failed with "received 0 items of ancdata".
    """

    ids: np.ndarray  # int64 [B]
    offsets: np.ndarray  # int64 [B+1]
    data: torch.Tensor  # uint8 [total bytes]

    def file(self, i: int) -> torch.Tensor:
        return self.data[int(self.offsets[i]):int(self.offsets[i + 1])]


def collate_bytes(items: list[tuple[int, bytes]]) -> PackedBytes:
    sizes = np.array([len(b) for _, b in items], np.int64)
    offsets = np.zeros(len(items) + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    data = np.empty(int(offsets[-1]), np.uint8)
    for (_, b), o in zip(items, offsets[:-1].tolist(), strict=True):  # one copy of the bytes, into the batch buffer
        data[o:o + len(b)] = np.frombuffer(b, np.uint8)
    return PackedBytes(np.array([i for i, _ in items], np.int64), offsets, torch.from_numpy(data))


def _chw_uint8(img) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


class JPEGDecoder:
    """Batch JPEG decode to `device` (nvJPEG on CUDA, libjpeg on the CPU); other formats with PIL on the CPU.

    CUDA: torchvision's `decode_jpeg(device="cuda")` allocates its outputs on the caller's current stream but
    writes them from nvJPEG's own stream, which does not wait for the caller's queued work. Called on the training
    stream, it can be handed a block the queued step is still reading (freed by the allocator, not yet by the GPU)
    and overwrite it: silent corruption (pytorch/vision PR 9606). So the decode runs with a stream of our own as
    the current stream, whose memory pool holds nothing but decoded images: each is marked used by the consumer
    stream (`record_stream`), so the allocator hands its block out again only after the consumer's work on it has
    run. The consumer stream waits for ours before it reads them.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __call__(self, batch: PackedBytes, index: InstanceIndex) -> tuple[list[torch.Tensor | None], dict]:
        """-> images [3,H,W] uint8 on the device in batch order (None where the file does not decode), and
        {id: reason} of those."""
        if self.stream is None:
            return self._decode(batch, index)
        consumer = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            images, bad = self._decode(batch, index)
        consumer.wait_stream(self.stream)
        for im in images:
            if im is not None:
                im.record_stream(consumer)
        return images, bad

    def _decode(self, batch: PackedBytes, index: InstanceIndex) -> tuple[list[torch.Tensor | None], dict]:
        raw = batch.data.numpy()
        n = len(batch.ids)
        is_jpeg = [batch.offsets[i + 1] - batch.offsets[i] > 2 and
                   raw[batch.offsets[i]:batch.offsets[i] + 2].tobytes() == JPEG_MAGIC for i in range(n)]
        out: list[torch.Tensor | None] = [None] * n
        bad: dict[int, str] = {}
        jpeg = [i for i in range(n) if is_jpeg[i]]
        if jpeg:
            try:
                decoded = decode_jpeg([batch.file(i) for i in jpeg], mode=ImageReadMode.RGB, device=self.device)
                for i, im in zip(jpeg, decoded, strict=True):
                    out[i] = im
            except RuntimeError:  # one bad file fails the batch call: fall back to one by one
                if self.stream is not None:  # the failed call's outputs went back to our pool: let it finish
                    self.stream.synchronize()
                for i in jpeg:
                    try:
                        out[i] = decode_jpeg(batch.file(i), mode=ImageReadMode.RGB, device=self.device)
                    except RuntimeError:  # what nvJPEG / libjpeg refuse (CMYK, ...) goes to PIL below
                        is_jpeg[i] = False
        pil = DecodedImages(index, _chw_uint8)
        for i in (i for i in range(n) if not is_jpeg[i]):  # PNG behind a .jpg name, CMYK, 16-bit: PIL
            image, iid, reason = pil[int(batch.ids[i])]
            if image is None:
                bad[iid] = reason
                continue
            out[i] = image.to(self.device)
        return out, bad

    def decode_file(self, iid: int, index: InstanceIndex) -> torch.Tensor:
        """One file (a substitute for an undecodable one): its image, or raises CorruptImageError."""
        (image,), bad = self(collate_bytes([RawBytes(index)[(0, 0, iid)]]), index)
        if image is None:
            raise CorruptImageError(bad[iid])
        return image


def crop_resize_flip(images: list[torch.Tensor], size: int, scale, ratio, flip_p: float,
                     gen: torch.Generator, rows: BatchRows | None = None) -> torch.Tensor:
    """Per-image random-resized-crop (antialiased bilinear) + flip of differently sized images -> [B,3,size,size]
    float in [0,1]. rows: which rows of the global batch the images are (`pipeline.augment.rand_rows`)."""
    rows = rows or BatchRows.whole(len(images))
    h = torch.tensor([im.shape[1] for im in images])
    w = torch.tensor([im.shape[2] for im in images])
    boxes = sample_rrc_boxes(h, w, scale, ratio, gen, rows=rows).round().long().tolist()
    flips = (rand_rows(gen, rows) < flip_p).tolist()
    out = []
    for im, (x1, y1, x2, y2), flip in zip(images, boxes, flips, strict=True):
        crop = im[None, :, y1:y2, x1:x2].float()
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(crop.flip(-1) if flip else crop)
    return torch.cat(out).div_(255.0).clamp_(0, 1)


class TorchGPULoader(LoaderBase):
    name = "torch-gpu"

    def __init__(self, cfg: Config, index: InstanceIndex, schedule, device: torch.device, batch_size: int,
                 bad_files: BadFiles | None = None):
        super().__init__(cfg, index, schedule, device, batch_size, bad_files)
        self.views = DeviceViews(cfg.aug, cfg.data.image_size, self.seed)
        self.decoder = JPEGDecoder(self.device)
        self.sampler = ScheduleBatchSampler(schedule, batch_size)
        workers = cfg.data.workers
        self.loader = DataLoader(RawBytes(index), batch_sampler=self.sampler, num_workers=workers,
                                 collate_fn=collate_bytes, persistent_workers=workers > 0,
                                 prefetch_factor=4 if workers > 0 else None, worker_init_fn=ignore_stop_signals)

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        self.sampler.set(epoch, start_batch)
        order = None
        for k, packed in enumerate(self.loader, start=start_batch):
            images, bad = self.decoder(packed, self.index)
            for iid, reason in bad.items():
                self.bad_files.add(iid, reason)
            ids = packed.ids.copy()
            for j in (j for j, im in enumerate(images) if im is None or int(ids[j]) in self.bad_files):
                # the substitute (`pipeline.base.substitutes`), read and decoded here: rare, so not batched
                order = np.asarray(self.schedule.order(epoch), np.int64) if order is None else order
                ids[j], images[j] = first_good(order, k * self.batch_size + j, self.bad_files,
                                               partial(self.decoder.decode_file, index=self.index))
            views = self.views(partial(crop_resize_flip, images), epoch, k, self.rows)
            ids_host = torch.from_numpy(ids)
            yield Batch(views[0], to_device_async(ids_host, self.device), tuple(views[1:]), ids_host)
