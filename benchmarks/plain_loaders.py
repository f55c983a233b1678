"""What a user would write instead of our backends: the reference rows of bench_loader.

Each one delivers the same output as our backends in the same mode (decode + random-resized-crop (0.08-1, 3/4-4/3)
+ flip -> normalised float [B,3,s,s] on the target device; "full" adds the SimCLR colour augmentation where the
library has it), from the same files, with the same worker/thread count:

  torchvision  stock `ImageFolder` + `transforms` + `DataLoader` (shuffle, drop_last, persistent workers): what
               most PyTorch users write first;
  ffcv-plain   a plain `ffcv.loader.Loader` with ffcv-imagenet's training pipeline on the same .beton
               (RandomResizedCropRGBImageDecoder, RandomHorizontalFlip, ToTensor, ToDevice, ToTorchImage,
               NormalizeImage); FFCV has no colour jitter/blur ops, so it has no "full" row;
  dali-plain   DALI's ResNet example pipeline: fn.readers.file + fn.decoders.image_random_crop + fn.resize +
               fn.crop_mirror_normalize, read with DALIGenericIterator (CPU operators here, "mixed" on a GPU).

Our wrappers add what these lack: our scheduler's order, instance ids, seeded per-batch augmentation (exact resume),
bad-file substitution. `vs_plain` in bench_loader is that tax.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from benchmarks.steady_run import SteadyRun, stop_loader
from pipeline.base import IMAGENET_MEAN, IMAGENET_STD

CROP_SCALE, CROP_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


def simclr_colour(size: int):
    """Spec §7's colour part as stock torchvision transforms (jitter 0.8, grayscale 0.2, blur 0.5 with a kernel of
    ~10 % of the image)."""
    from torchvision import transforms as T

    k = max(3, (size // 10) | 1)
    return [T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2),
            T.RandomApply([T.GaussianBlur(k, sigma=(0.1, 2.0))], p=0.5)]


class TorchvisionRun(SteadyRun):
    def __init__(self, root: Path, size: int, batch: int, workers: int, mode: str, batches: int, settle: int,
                 device: torch.device):
        from torchvision import datasets
        from torchvision import transforms as T

        self.device, self.batch_size = device, batch
        colour = simclr_colour(size) if mode == "full" else []
        tf = T.Compose([T.RandomResizedCrop(size, scale=CROP_SCALE, ratio=CROP_RATIO), T.RandomHorizontalFlip(),
                        *colour, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        self.loader = torch.utils.data.DataLoader(
            datasets.ImageFolder(str(root), transform=tf), batch_size=batch, shuffle=True, drop_last=True,
            num_workers=workers, persistent_workers=workers > 0, pin_memory=device.type == "cuda")
        self._warm_up(batches, settle)

    def __len__(self) -> int:
        return len(self.loader)

    def iter_epoch(self, epoch: int):
        for images, labels in self.loader:
            yield images.to(self.device, non_blocking=True), labels


class FFCVPlainRun(SteadyRun):
    def __init__(self, beton: Path, size: int, batch: int, workers: int, batches: int, settle: int,
                 device: torch.device):
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, ToDevice, ToTensor, ToTorchImage

        self.device, self.batch_size = device, batch
        mean, std = np.array(IMAGENET_MEAN) * 255, np.array(IMAGENET_STD) * 255
        decode = [RandomResizedCropRGBImageDecoder((size, size), scale=CROP_SCALE, ratio=CROP_RATIO),
                  RandomHorizontalFlip()]
        if device.type == "cuda":  # ffcv-imagenet's order: normalise on the GPU, fp16 there
            image = [*decode, ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(),
                     NormalizeImage(mean, std, np.float16)]
        else:  # FFCV normalises on the CPU with numba before ToTensor
            image = [*decode, NormalizeImage(mean, std, np.float32), ToTensor(), ToTorchImage()]
        threads = torch.get_num_threads()
        # ffcv-imagenet's loader as it is: our converter writes its two fields (image, label) and no tombstones
        self.loader = Loader(str(beton), batch_size=batch, num_workers=workers, order=OrderOption.RANDOM,
                             os_cache=True, drop_last=True,
                             pipelines={"image": image, "label": [IntDecoder(), ToTensor()]})
        torch.set_num_threads(threads)  # FFCV sets torch's threads to its worker count
        self._epoch = None  # FFCV's epoch iterator (a thread) of the current repeat
        self._warm_up(batches, settle)

    def __len__(self) -> int:
        return len(self.loader)

    def iter_epoch(self, epoch: int):
        if self._epoch is not None:  # a repeat abandoned it mid-epoch: its thread waits on a full queue
            stop_loader(self)
        self._epoch = iter(self.loader)
        return self._epoch


class DALIPlainRun(SteadyRun):
    def __init__(self, root: Path, size: int, batch: int, threads: int, batches: int, settle: int,
                 device: torch.device, seed: int = 0):
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self.device, self.batch_size = device, batch
        gpu = device.type == "cuda"

        @pipeline_def
        def train_pipe():
            jpegs, labels = fn.readers.file(file_root=str(root), random_shuffle=True, name="Reader")
            images = fn.decoders.image_random_crop(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                                   random_area=list(CROP_SCALE), random_aspect_ratio=list(CROP_RATIO))
            images = fn.resize(images, resize_x=size, resize_y=size)
            images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                              mean=[255 * m for m in IMAGENET_MEAN],
                                              std=[255 * s for s in IMAGENET_STD], mirror=fn.random.coin_flip())
            return images, labels

        device_id = (device.index if device.index is not None else torch.cuda.current_device()) if gpu else None
        pipe = train_pipe(batch_size=batch, num_threads=threads, device_id=device_id, seed=seed)
        pipe.build()
        self.length = pipe.epoch_size("Reader") // batch
        self.loader = DALIGenericIterator([pipe], ["images", "labels"], reader_name="Reader",
                                          last_batch_policy=LastBatchPolicy.DROP, auto_reset=True)
        self._warm_up(batches, settle)

    def __len__(self) -> int:
        return self.length

    def iter_epoch(self, epoch: int):
        """The iterator's current epoch from where the last repeat left it (DALI's iterator cannot restart an
        epoch it is in the middle of; a repeat measures the steady state either way), then the next ones."""
        while True:
            try:
                out = next(self.loader)
            except StopIteration:  # auto_reset: the next call starts a new epoch
                return
            yield out[0]["images"], out[0]["labels"]
